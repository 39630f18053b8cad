"""Batches of transformers' Trainer under sequence parallelism: the sp ranks of a dp group read the same batch, each
keeps its slice, and evaluation sees every sample once (Note [Trainer under sequence parallelism] in hf.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

import longseq
from longseq import Mesh
from longseq.loss import IGNORE_INDEX

# What padding-free collators (DataCollatorWithFlattening, TRL's padding_free) add for varlen kernels. They describe
# the whole row, not a rank's slice; longseq reads documents from position_ids instead.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def reshard_dataloader(loader, mesh: Mesh, *, repeat_samples: bool):
    """Re-point the shard accelerate gave this process (one of W) at its dp group (one of dp), in place.

    repeat_samples=False stops accelerate from filling the last global batch with samples from the start of the
    dataset (what evaluation must not count twice); EvalBatches then keeps the ranks in step.
    """
    if isinstance(loader, DataLoaderDispatcher):
        if mesh.sp == 1:
            return loader
        raise ValueError(
            "accelerate dispatches this iterable dataset's batches from rank 0 to every process, so the sp ranks of "
            "a group would get different batches. Pass TrainingArguments(accelerator_config={'dispatch_batches': "
            "False}) or a map-style dataset.")
    for shard in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None),
                  getattr(loader, "dataset", None)):
        if isinstance(shard, (BatchSamplerShard, IterableDatasetShard)):
            shard.num_processes, shard.process_index = mesh.dp, mesh.dp_rank
            if isinstance(shard, BatchSamplerShard) and not repeat_samples:
                shard.even_batches = False
            return loader
    if mesh.sp == 1:
        return loader
    raise ValueError(
        f"longseq cannot find how this {type(loader).__name__} splits batches over processes, so it cannot give the "
        f"{mesh.sp} sp ranks of a group the same batches. Use the Trainer's own dataloaders with a map-style "
        "dataset (datasets.Dataset), a torch IterableDataset, or a streaming dataset with fewer shards than "
        "processes.")


class EvalBatches:
    """An eval dataloader whose ranks all take the same number of steps: a dp group that has run out of batches
    (accelerate no longer repeats samples, see reshard_dataloader) takes batches without targets until every rank is
    done, since each forward pass is collective (FSDP2's all-gathers, the loss's all-reduce)."""

    def __init__(self, loader, mesh: Mesh, device: torch.device):
        self.loader, self.mesh, self.device = loader, mesh, device

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches, last = iter(self.loader), None
        while True:
            batch = next(batches, None)
            if not self._any_rank_has(batch is not None):
                return
            last = batch if batch is not None else without_targets(last, self.mesh, self.device)
            yield last

    def _any_rank_has(self, mine: bool) -> bool:
        flag = torch.tensor([int(mine)], device=self.device)
        if self.mesh.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def without_targets(batch: dict | None, mesh: Mesh, device: torch.device) -> dict:
    """A batch that runs the model but adds nothing to the loss: `batch` with every label ignored, or a short row."""
    if batch is None:
        ids = torch.zeros((1, 2 * mesh.sp), dtype=torch.long, device=device)
        return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}
    empty = dict(batch)
    empty["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    empty.pop("shift_labels", None)
    return empty


def model_batch(inputs: dict, mesh: Mesh) -> dict:
    """This rank's slice of a collated batch (longseq.shard_batch), after refusing what would make it inexact."""
    batch = dict(inputs)
    varlen = [key for key in VARLEN_KEYS if key in batch]
    if varlen and "position_ids" not in batch:
        raise ValueError(
            f"The batch flattens several documents into a row ({', '.join(varlen)}) but has no position_ids, which "
            "is where longseq reads document boundaries from; without them documents would attend to each other. "
            "Use DataCollatorWithFlattening(return_position_ids=True) or TRL's padding_free=True.")
    for key in varlen:
        del batch[key]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; longseq takes a (batch, sequence) padding mask or none. "
            "Pack documents with position_ids restarting per document instead of a custom 4-D mask.")
    if "loss_weights" in batch:
        batch["shift_loss_weights"] = shifted_weights(batch.pop("loss_weights"), batch["input_ids"])
    return longseq.shard_batch(batch, mesh)


def shifted_weights(weights: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """A batch's `loss_weights` (one per label, as the labels are given) moved like the labels: weight t goes with the
    target of token t − 1 (the last token has none)."""
    if weights.shape != input_ids.shape:
        raise ValueError(f"loss_weights has shape {tuple(weights.shape)}; it needs one weight per label, the shape of "
                         f"input_ids {tuple(input_ids.shape)}.")
    shifted = torch.zeros_like(weights, dtype=torch.float32)
    shifted[:, :-1] = weights[:, 1:]
    return shifted


def check_same_batch(input_ids: torch.Tensor, mesh: Mesh) -> None:
    """Every sp rank of a group must hold the same full batch before sharding it: compare a fingerprint."""
    if mesh.sp == 1:
        return
    ids = input_ids.long()
    weights = torch.arange(ids.shape[-1], device=ids.device) % 1009 + 1
    shape = torch.tensor(ids.shape, device=ids.device)
    mine = torch.cat([shape, (ids * weights).sum().reshape(1)])
    fingerprints = [torch.empty_like(mine) for _ in range(mesh.sp)]
    dist.all_gather(fingerprints, mine, group=mesh.sp_group)
    if any(not torch.equal(f, fingerprints[0]) for f in fingerprints):
        raise ValueError(
            f"The sp ranks of data-parallel group {mesh.dp_rank} received different batches (shapes "
            f"{[tuple(f[:-1].tolist()) for f in fingerprints]}); all sp ranks of a group must read the same batch. "
            "A custom dataloader or sampler must shard by dp rank (process rank // sp), not by process rank.")
