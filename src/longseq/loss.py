"""Note [Exact global loss]

The loss of a step is the mean over every valid token of the global batch, whichever rank holds it:
    L = Σ_ranks loss_sum_r / Σ_ranks count_r
Each rank computes its loss_sum_r and count_r; one all-reduce of the pair (no host sync) gives the totals N. The
returned value is L on every rank, and its gradient is W · ∇(loss_sum_r) / N, W being the number of ranks, so that the
usual data-parallel gradient *average* over all W ranks (DDP, FSDP2, or longseq.sync_gradients) yields exactly ∇L.
A rank without valid tokens contributes 0 and never divides by zero.

Note [Loss options]
~~~~~~~~~~~~~~~~~~~
With logits z (after any softcap) and lse = logsumexp(z), the loss of a token with target y and weight w is

    w · ( lse − (1 − ε)·z_y − (ε / V)·Σ_v z_v  +  λ·lse² )
         └ cross-entropy with label smoothing ε ┘   └ z-loss ┘

ε = 0 and λ = 0 give plain cross-entropy; ε's form is F.cross_entropy(label_smoothing=ε)'s and transformers'
LabelSmoother's, λ·lse² is PaLM's and OLMo's z-loss. Weights default to 1, and the mean still divides by the
number of valid tokens (weights scale tokens, they do not renormalise the batch). The gradient with respect to z is

    w · ( softmax(z)·(1 + 2λ·lse) − (1 − ε)·onehot(y) − ε / V )

which the tiled loss computes tile by tile (Note [Tiled loss]); the untiled path below is its reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq.mesh import Mesh

IGNORE_INDEX = -100
"""The label of a token without a target (transformers' and PyTorch's convention); every loss skips it."""


@dataclass(kw_only=True, frozen=True)
class LossConfig:
    """Options of the next-token loss (Note [Loss options]); the defaults give plain cross-entropy."""

    label_smoothing: float = 0.0
    """ε: the target keeps 1 − ε of the probability, the rest spreads evenly over the vocabulary (as
    TrainingArguments.label_smoothing_factor and F.cross_entropy(label_smoothing=...))."""
    z_loss: float = 0.0
    """λ: adds λ·logsumexp(logits)² per token, keeping the softmax normaliser near 1 (PaLM, OLMo use 1e-4)."""

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"LossConfig.label_smoothing={self.label_smoothing} must be in [0, 1).")
        if self.z_loss < 0:
            raise ValueError(f"LossConfig.z_loss={self.z_loss} must be >= 0 (0 switches it off).")


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
                      softcap: float | None, loss: LossConfig | None = None,
                      weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Untiled reference path: full fp32 logits, then the summed loss of Note [Loss options] and the valid-token
    count. weights: one per label (already shifted, like the labels), or None for 1."""
    loss = loss or LossConfig()
    logits = lm_head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    flat, targets = logits.flatten(0, -2), labels.flatten()
    per_token = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="none",
                                label_smoothing=loss.label_smoothing)
    if loss.z_loss:
        per_token = per_token + loss.z_loss * torch.logsumexp(flat, dim=-1).square()
    valid = targets != IGNORE_INDEX
    scale = valid.float() if weights is None else torch.where(valid, weights.flatten().float(), 0.0)
    return (torch.where(valid, per_token, 0.0) * scale).sum(), valid.sum()


def causal_lm_loss(model, batch: dict, mesh: Mesh | None = None, *, num_tokens: torch.Tensor | None = None):
    """Global mean next-token loss of a (sharded) batch on a model prepared by longseq.apply.

    batch: the output of longseq.shard_batch (input_ids, position_ids, shift_labels, ...).
    """
    if "shift_labels" not in batch:
        raise ValueError("causal_lm_loss needs 'shift_labels': pass the batch through longseq.shard_batch first.")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, use_cache=False, longseq_num_tokens=num_tokens).loss
