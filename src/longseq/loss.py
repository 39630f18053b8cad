"""Note [Exact global loss]

The loss of a step is the mean over every valid token of the global batch, whichever rank holds it:
    L = Σ_ranks loss_sum_r / Σ_ranks count_r
Each rank computes its loss_sum_r and count_r; one all-reduce of the pair (no host sync) gives the totals N. The
returned value is L on every rank, and its gradient is W · ∇(loss_sum_r) / N, W being the number of ranks, so that the
usual data-parallel gradient *average* over all W ranks (DDP, FSDP2, or longseq.sync_gradients) yields exactly ∇L.
A rank without valid tokens contributes 0 and never divides by zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq.mesh import Mesh

IGNORE_INDEX = -100
"""The label of a token without a target (transformers' and PyTorch's convention); every loss skips it."""


def global_mean(loss_sum: torch.Tensor, count: torch.Tensor, mesh: Mesh | None,
                num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Note [Exact global loss]. `num_tokens` replaces the all-reduced count (e.g. over gradient accumulation)."""
    world = mesh.world_size if mesh is not None else 1
    totals = torch.stack([loss_sum.detach().float(), count.detach().float()])
    if world > 1:
        dist.all_reduce(totals)
    denominator = (totals[1] if num_tokens is None else num_tokens.float()).clamp(min=1)
    share = loss_sum.float() * world / denominator
    return share + (totals[0] / denominator - share).detach()


def cross_entropy_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                      softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Untiled reference path: full fp32 logits, then the summed cross-entropy and the valid-token count."""
    logits = lm_head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss_sum = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


def causal_lm_loss(model, batch: dict, mesh: Mesh | None = None, *, num_tokens: torch.Tensor | None = None):
    """Global mean next-token loss of a (sharded) batch on a model prepared by longseq.apply.

    batch: the output of longseq.shard_batch (input_ids, position_ids, shift_labels, ...).
    """
    if "shift_labels" not in batch:
        raise ValueError("causal_lm_loss needs 'shift_labels': pass the batch through longseq.shard_batch first.")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, use_cache=False, longseq_num_tokens=num_tokens).loss
