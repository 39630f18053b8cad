"""Attention kernel calls over groups of heads, so that a backward's buffers scale with a group, not with all heads.

Note [Attention head groups]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The cuDNN and flash kernels take K/V with as many heads as Q (longseq expands GQA's shared K/V heads for them), and
their backward allocates, for all heads of a call at once, dq, dk and dv of the expanded heads and an fp32 dq
accumulator. For the Llama-3-8B shape (32 query heads of 128, 8 K/V heads) that was 40 KiB per token, beside 16 KiB
of expanded K/V, all alive at the step's peak (device call 20, docs/memory.md). But heads are independent: the
gradients of a head depend only on its own q, k, v, out, lse and dout. So a kernel call may take any group of heads,
and the calls together give exactly the gradients of one call over all heads:

    query heads     0 1 2 3 | 4 5 6 7 | ...      K/V head j serves query heads j·g .. j·g+g−1  (g = Hq / Hkv)
    one call        └──┬──┘  K/V head 0 expanded ×4 for this call only
    gradients       dq[:, 0:4] = the call's dq;   dk[:, 0] = Σ of the call's 4 copies (fp32, rounded once)

A call takes m whole K/V heads with their g·m query heads, or h query heads of one K/V head (h divides g; that K/V
head's dk/dv then sum over its g/h calls in fp32 and are rounded once). HeadGroups picks the largest such group whose
backward buffers fit a memory target (MemoryConfig.attention_memory_mib): per query head about
B · L · D · (5 · itemsize + 4) bytes (dq, dk, dv, expanded k and v in the input dtype, the fp32 accumulator). Smaller
groups mean more, smaller kernel launches; at the lengths where the target bites, each still has thousands of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longseq.parallel.sizes import group_size, heads_within


@dataclass(frozen=True)
class HeadCall:
    """One kernel call: query heads `q`, K/V heads `kv` (expanded to q's count for the call)."""

    q: slice
    kv: slice
    split: bool  # part of one K/V head's query heads (its dk/dv sum over several calls)
    last: bool  # the last call of its K/V heads

    def expand(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of this call's K/V heads, each repeated for this call's query heads."""
        copies = (self.q.stop - self.q.start) // (self.kv.stop - self.kv.start)
        return tuple(t[:, self.kv].repeat_interleave(copies, dim=1) for t in (k, v))


@dataclass(frozen=True)
class HeadGroups:
    """How many query heads one call of the block kernels takes (Note [Attention head groups])."""

    heads: int | None = None
    """Query heads per call, rounded down to an allowed group size; None: from memory_mib."""
    memory_mib: int | None = None
    """Target for one backward call's buffers; with heads None too: all heads in one call."""

    def size(self, q: torch.Tensor, k: torch.Tensor) -> int:
        """Query heads per call for q (B, Hq, Lq, D) and k (B, Hkv, Lk, D)."""
        heads, kv_heads = q.shape[1], k.shape[1]
        if self.heads is not None:
            return group_size(heads, kv_heads, self.heads)
        if self.memory_mib is not None:
            return heads_within(self.memory_mib, q.shape[0], heads, kv_heads, max(q.shape[2], k.shape[2]), q.shape[3],
                                q.element_size())
        return heads

    def calls(self, q: torch.Tensor, k: torch.Tensor) -> list[HeadCall]:
        heads, kv_heads = q.shape[1], k.shape[1]
        size, group = self.size(q, k), heads // kv_heads
        if size >= group:
            per = size // group
            return [HeadCall(slice(j * group, (j + per) * group), slice(j, j + per), False, True)
                    for j in range(0, kv_heads, per)]
        return [HeadCall(slice(h, h + size), slice(h // group, h // group + 1), True, (h + size) % group == 0)
                for h in range(0, heads, size)]


ALL_HEADS = HeadGroups()


def fold_heads(grad: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum the gradients of the g copies of each K/V head (the adjoint of the expansion); torch sums half precision in
    fp32 internally, so only the result is rounded to `dtype`."""
    b, heads, length, dim = grad.shape
    if heads == kv_heads:
        return grad.to(dtype)
    return grad.view(b, kv_heads, heads // kv_heads, length, dim).sum(2, dtype=dtype)


class KVGradients:
    """dk and dv (in `dtype`, laid out like k and v) filled call by call."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        self.dk, self.dv, self.dtype = torch.empty_like(k, dtype=dtype), torch.empty_like(v, dtype=dtype), dtype
        self.partial: list[torch.Tensor] | None = None

    def add(self, call: HeadCall, gk: torch.Tensor, gv: torch.Tensor) -> None:
        if not call.split:
            kv_heads = call.kv.stop - call.kv.start
            self.dk[:, call.kv] = fold_heads(gk, kv_heads, self.dtype)
            self.dv[:, call.kv] = fold_heads(gv, kv_heads, self.dtype)
            return
        acc = torch.promote_types(gk.dtype, torch.float32)
        if self.partial is None:
            self.partial = [gk.sum(1, keepdim=True, dtype=acc), gv.sum(1, keepdim=True, dtype=acc)]
        else:  # one sum at a time beside the running ones
            self.partial[0].add_(gk.sum(1, keepdim=True, dtype=acc))
            self.partial[1].add_(gv.sum(1, keepdim=True, dtype=acc))
        if call.last:
            self.dk[:, call.kv], self.dv[:, call.kv] = self.partial
            self.partial = None
