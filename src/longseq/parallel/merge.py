"""Exact log-sum-exp merge of partial attention results (see Note [Ring attention] in ring.py).

A block of keys gives each query row a partial output o_i (softmax-weighted over that block only) and the block's
log-sum-exp l_i of the scaled scores. Over several blocks the exact result is

    l = log Σ exp(l_i)        o = Σ exp(l_i − l) · o_i

Merging one block at a time into an fp32 accumulator gives the same sums. Rounding stays at the level of a single
merge because the weights exp(l_i − l) are in [0, 1] and sum to one; it does not add up with the number of blocks as
it does when the accumulator is rounded to bf16 after every block.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precisions and fp32; fp64 stays fp64 (useful for references)."""
    return torch.promote_types(dtype, torch.float32)


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty merge state for queries q (..., L, D): output 0 and log-sum-exp −inf ("no key seen yet")."""
    dtype = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=dtype, device=q.device)
    return out, lse


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge one block's (out, lse) into the accumulators, in place (they may be views of larger ones).

    Rows whose log-sum-exp is −inf on either side (no key seen) get weight 0 on that side; a row with −inf on both
    sides stays (0, −inf) instead of turning into NaN.
    """
    lse = lse.to(lse_acc.dtype)
    merged = torch.logaddexp(lse_acc, lse)
    # exp(−inf − (−inf)) would be NaN; shifting such rows by 0 instead gives weights exp(−inf) = 0.
    shift = merged.masked_fill(merged == float("-inf"), 0.0)
    keep = torch.exp(lse_acc - shift).unsqueeze(-1)
    take = torch.exp(lse - shift).unsqueeze(-1)
    out_acc.mul_(keep).add_(take * out.to(out_acc.dtype))
    lse_acc.copy_(merged)
