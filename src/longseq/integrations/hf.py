"""longseq inside transformers' Trainer and TRL's SFTTrainer: sequence parallelism, the memory features, and exact
train and eval losses, added to a trainer that is already built.

    torchrun --nproc-per-node 2 examples/hf_trainer.py --sp 2        # GPUs (NCCL) or CPU (gloo)
    accelerate launch --num-processes 8 my_sft.py                    # any accelerate config: DDP or FSDP2

An existing script changes two lines (three with a MemoryConfig):

    from longseq.integrations.hf import prepare_trainer
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    prepare_trainer(trainer, sp=4)
    trainer.train()

Note [Trainer under sequence parallelism]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
prepare_trainer calls longseq.apply on the trainer's model (before accelerate wraps it in DDP or FSDP2, which
happens in train()) and gives the trainer a subclass of its own class, as torch's fully_shard does with modules:
nothing in transformers changes for any other trainer. The subclass overrides Trainer's documented extension points:

    get_*_dataloader   accelerate shards batches over all W processes; each shard is re-pointed at the dp group, so
                       the sp ranks of a group read the same batches (rank r reads shard r // sp of dp)
    get_batch_samples  num_items_in_batch = the valid-token count N of the whole accumulation window over all dp
                       groups: each rank counts its slice after shard_batch, one all-reduce sums them
    compute_loss       shard_batch, then causal_lm_loss(num_tokens=N): each micro-batch returns its share of the
                       window's mean, and DDP's or FSDP2's gradient average over the W ranks gives its exact
                       gradient (Note [Exact global loss]), so the loss is already scaled for accumulation
    get_eval_dataloader  as above, but accelerate no longer repeats samples to fill the last global batch (they
                       would count twice); a dp group out of batches runs batches without targets until all are done
    prediction_step    the same sharded forward under no_grad; it adds the batch's global loss sum and valid-token
    evaluation_loop    count to running totals, and eval_loss = sum / count over the whole eval set: the mean over
                       its tokens, where stock Trainer averages per-batch means

Every sp rank checks that its group holds the same batch before sharding it, so a sampler that splits batches
over sp ranks fails loudly instead of training on a mix of sequences.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers.modeling_outputs import CausalLMOutputWithPast

import longseq
from longseq import Mesh, MemoryConfig
from longseq.integrations.hf_data import EvalBatches, check_same_batch, model_batch, reshard_dataloader
from longseq.loss import IGNORE_INDEX
from longseq.models.anatomy import find_causal_lm

logger = logging.getLogger("longseq")


def prepare_trainer(trainer, *, sp: int | None = None, ring: int | None = None,
                    memory: MemoryConfig | bool = True, attention: str | None = None, z_loss: float = 0.0):
    """Run `trainer` (a transformers Trainer, TRL SFTTrainer or subclass, built but not trained) sequence-parallel
    with longseq's memory features; returns the same trainer. See Note [Trainer under sequence parallelism].

    sp: sequence-parallel degree (default: every process); the data-parallel degree is the rest.
    ring: ring degree inside sp (default: Ulysses as wide as the heads allow, ring for the rest; see init_mesh).
    memory: True for every memory feature (MemoryConfig()), False for none, or a MemoryConfig.
    attention: the kernel run on the gathered sequence (default: the model's attn_implementation).
    z_loss: weight of the z-loss added to each token's loss (Note [Loss options]); TrainingArguments'
        label_smoothing_factor is honoured too, and a batch's `loss_weights` (one per label) weight its tokens.
    """
    if isinstance(trainer, _LongSeqTrainer):
        raise RuntimeError("prepare_trainer was already called on this trainer; call it once.")
    memory = MemoryConfig() if memory is True else (memory or None)
    refuse_unsupported(trainer, memory)
    mesh = longseq.init_mesh(sp=sp, ring=ring, model=trainer.model)
    if mesh.sp > 1 and getattr(trainer.args, "train_sampling_strategy", None) == "batch_rebalance":
        raise ValueError("train_sampling_strategy='batch_rebalance' hands each process its own batches, so the sp "
                         "ranks of a group would not share one; use 'random', 'sequential' or 'group_by_length'.")
    hand_checkpointing_to_longseq(trainer, memory)
    loss = longseq.LossConfig(label_smoothing=trainer.args.label_smoothing_factor, z_loss=z_loss)
    longseq.apply(trainer.model, mesh, memory, attention=attention, loss=loss)
    trainer.__class__ = _trainer_class(type(trainer))
    trainer._longseq = _TrainerState(mesh=mesh)
    # The loss is normalised by num_items_in_batch, so the Trainer must not divide it by the accumulation steps.
    trainer.model_accepts_loss_kwargs = True
    return trainer


@dataclass
class _TrainerState:
    mesh: Mesh
    """The dp × sp mesh the model was applied with."""
    eval_totals: list = field(default_factory=list)
    """Global loss sums and valid-token counts of the eval batches seen so far in this evaluation_loop."""


class _LongSeqTrainer:
    """Placed before the trainer's own class by prepare_trainer (Note [Trainer under sequence parallelism])."""

    _longseq: _TrainerState
    loss_is_scaled_for_ga = True

    def get_train_dataloader(self):
        return reshard_dataloader(super().get_train_dataloader(), self._longseq.mesh, repeat_samples=True)

    def get_eval_dataloader(self, eval_dataset=None):
        return self._eval_batches(super().get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return self._eval_batches(super().get_test_dataloader(test_dataset))

    def _eval_batches(self, loader):
        mesh = self._longseq.mesh
        return EvalBatches(reshard_dataloader(loader, mesh, repeat_samples=False), mesh, self.args.device)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        mesh = self._longseq.mesh
        count = torch.zeros((), dtype=torch.long, device=device)
        for batch in batches:
            count += (model_batch(batch, mesh)["shift_labels"] != IGNORE_INDEX).sum().to(device)
        if mesh.world_size > 1:
            dist.all_reduce(count)
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mesh = self._longseq.mesh
        batch = model_batch(inputs, mesh)
        check_same_batch(inputs["input_ids"], mesh)
        tokens = None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = longseq.causal_lm_loss(model, batch, mesh, num_tokens=tokens)
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        mesh = self._longseq.mesh
        batch = model_batch(inputs, mesh)
        check_same_batch(inputs["input_ids"], mesh)
        count = (batch["shift_labels"] != IGNORE_INDEX).sum()
        if mesh.world_size > 1:
            dist.all_reduce(count)
        with torch.no_grad():
            loss_sum = longseq.causal_lm_loss(model, batch, mesh, num_tokens=torch.ones((), device=count.device))
        self._longseq.eval_totals.append(torch.stack([loss_sum.double(), count.double()]))
        return (loss_sum / count.clamp(min=1)).detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._longseq.eval_totals = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self._longseq.eval_totals:
            loss_sum, count = torch.stack(self._longseq.eval_totals).sum(0).tolist()
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / max(count, 1)
        return output


@functools.cache
def _trainer_class(base: type) -> type:
    return type(f"LongSeq{base.__name__}", (_LongSeqTrainer, base), {"__module__": __name__})


def refuse_unsupported(trainer, memory: MemoryConfig | None) -> None:
    """One clear error for each trainer setting that the integration cannot run exactly."""
    args = trainer.args
    problems = {
        "model_init": (trainer.model_init is not None,
                       "model_init builds a new model for each run, which prepare_trainer never saw; pass model=..."),
        "compute_loss_func": (trainer.compute_loss_func is not None,
                              "a custom loss needs the full logits, which longseq never builds (each rank holds a "
                              "slice of the sequence, and the tiled loss keeps no logits); remove it"),
        "compute_metrics": (trainer.compute_metrics is not None or trainer.preprocess_logits_for_metrics is not None,
                            "metrics from logits need the full logits, which longseq never builds; evaluation "
                            "reports the exact eval_loss; remove compute_metrics/preprocess_logits_for_metrics"),
        "deepspeed": (trainer.is_deepspeed_enabled, "use FSDP2 (accelerate's FSDP plugin, fsdp_version=2) or DDP"),
        "n_gpu": (args.n_gpu > 1, "one process drives several GPUs (torch.nn.DataParallel); launch one process per "
                                  "GPU with torchrun"),
        "use_liger_kernel": (getattr(args, "use_liger_kernel", False),
                             "Liger's kernels replace the modules longseq tiles; set use_liger_kernel=False "
                             "(MemoryConfig's tiled MLP and loss do the same job)"),
        "loss_type": (getattr(args, "loss_type", "nll") not in ("nll", "chunked_nll"),
                      "longseq computes the token-mean cross-entropy ('nll') only; set loss_type='nll'"),
        "activation_offloading": (getattr(args, "activation_offloading", False) and memory is not None
                                  and memory.offload_checkpoints,
                                  "TRL's activation offloading and MemoryConfig.offload_checkpoints both move "
                                  "activations to the host; keep one (set activation_offloading=False)"),
    }
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        problems["fsdp_version"] = (getattr(plugin, "fsdp_version", 1) != 2,
                                    "use FSDP2: fsdp_config={'fsdp_version': 2} (or fsdp_version: 2 in accelerate's "
                                    "config)")
        problems["fsdp activation_checkpointing"] = (
            plugin.activation_checkpointing and memory is not None and memory.offload_checkpoints,
            "FSDP's activation checkpointing and MemoryConfig.offload_checkpoints would checkpoint each layer twice; "
            "set fsdp_config={'activation_checkpointing': False}")
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None:
        problems["parallelism_config"] = (
            getattr(parallelism, "cp_enabled", False) or getattr(parallelism, "sp_enabled", False),
            "accelerate's cp_size/sp_size shard the sequence themselves; drop them (longseq's sp replaces them)")
    for name, (bad, fix) in problems.items():
        if bad:
            raise ValueError(f"longseq.integrations.hf: {name} is not supported: {fix}.")


def hand_checkpointing_to_longseq(trainer, memory: MemoryConfig | None) -> None:
    """MemoryConfig.offload_checkpoints checkpoints every decoder layer; HF's activation checkpointing (on by default
    in TRL's configs) would checkpoint each layer a second time, so it is switched off."""
    if memory is None or not memory.offload_checkpoints:
        return
    causal = find_causal_lm(trainer.model)
    model_checkpoints = any(getattr(module, "gradient_checkpointing", False) for module in causal.modules())
    # activation_checkpointing since transformers 5.2x; gradient_checkpointing before, and an alias after.
    switches = [name for name in ("activation_checkpointing", "gradient_checkpointing")
                if getattr(trainer.args, name, None)]
    if not (switches or model_checkpoints):
        return
    logger.warning("longseq: activation checkpointing switched off; MemoryConfig.offload_checkpoints checkpoints "
                   "(and offloads) every decoder layer instead.")
    for name in switches:
        setattr(trainer.args, name, False)
    if model_checkpoints:
        (getattr(causal, "activation_checkpointing_disable", None) or causal.gradient_checkpointing_disable)()
