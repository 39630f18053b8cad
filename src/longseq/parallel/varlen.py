"""Note [Variable-length blocks]

The ring plan (ring.py) cuts a rank's attention into kernel calls: a causal square per document segment, a full
block per pair of chunks that one document joins. Packed rows make many small calls, and each kernel call costs host
time (tens of microseconds) whatever its size. Calls that sit next to each other in both q and k (each one's q and k
ranges start where the previous one's end, with the same causal flag) form one variable-length call: q and k are
sequences of segments, cu_seqlens lists where each segment starts, and the kernel attends segment i of q to segment i
of k only. Causal segments are squares (equal q and k lengths), so the kernel's causal alignment does not matter.

    local q:  [ a a a | b b | c c c c ]       one call with cu_seqlens_q = cu_seqlens_k = [0, 3, 5, 9]
    local k:  [ a a a | b b | c c c c ]       instead of three

A row's causal document squares are adjacent (R = 1, and a ring's first step), and so are the blocks of one ring step
under Note [Document placement] (balance.py): its layout keeps early chunks, late chunks and tails each in document
order. So a step is a handful of calls, however many documents the row holds.

Which kernel runs a group: on CUDA (bf16/fp16), FlashAttention-2's variable-length kernel
(aten._flash_attention_forward/_backward with cumulative lengths; its backward takes the output and log-sum-exp, so
the ring's merged results and the attention cache work unchanged). It is ~0.57× cuDNN's speed on large blocks (H200,
torch 2.11: ~326 vs ~575 TFLOP/s), so a block of at least DENSE_MIN_BLOCK query × key pairs is left out of groups and
runs as its own dense call (cuDNN); a group keeps the small ones, where per-call time dominates. Elsewhere (CPU, fp32,
a torch without the op, or an op that refuses the shapes) a group runs as one dense call per segment, as before.
Head groups (Note [Attention head groups]) cut a varlen call like a block call: one call per group of heads, sized
by the group's tokens; the kernel takes GQA's K/V heads unexpanded, and a K/V head split over calls sums its dk/dv
in fp32.
cuDNN's own ragged path (aten._cudnn_attention_forward with cum_seq) is not used: torch 2.11 builds its graph on every
call and its backward mis-sizes buffers for ragged input (fixed in later releases).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from longseq.parallel.head_groups import ALL_HEADS, HeadCall, HeadGroups, KVGradients
from longseq.parallel.kernels import CUDA_DTYPES, block_backward, block_forward
from longseq.parallel.merge import accumulation_dtype
from longseq.parallel.window import band_backward, band_forward

aten = torch.ops.aten

DENSE_MIN_BLOCK = 2048 * 2048
"""A block of at least this many query × key positions runs as its own (cuDNN) call instead of joining a group."""
_varlen_refused: list[str] = []  # the first error of the varlen op in this process: groups run per segment after it


@dataclass(frozen=True)
class Call:
    """One dense kernel call: local q positions × held k positions."""

    q: slice
    k: slice
    causal: bool
    band: tuple[int, int] | None = None
    """(offset, window) of a block a sliding window cuts (Note [Sliding windows on blocks]); None: no cut."""


@dataclass(frozen=True)
class Group:
    """Calls adjacent in q and k, run as one variable-length call (Note [Variable-length blocks])."""

    calls: tuple[Call, ...]

    @property
    def q(self) -> slice:
        return slice(self.calls[0].q.start, self.calls[-1].q.stop)

    @property
    def k(self) -> slice:
        return slice(self.calls[0].k.start, self.calls[-1].k.stop)

    @property
    def causal(self) -> bool:
        return self.calls[0].causal


def group_calls(calls: list[Call]) -> list[Call | Group]:
    """Chain calls whose q and k ranges continue each other into Groups; large blocks and bands stay alone. Order: by
    the position of each item's first call in `calls`."""
    small = [c for c in calls if _joins(c)]
    following = {(c.q.start, c.k.start, c.causal): c for c in small}
    successor = {id(c): following.get((c.q.stop, c.k.stop, c.causal)) for c in small}
    has_predecessor = {id(s) for s in successor.values() if s is not None}
    items: list[Call | Group] = []
    for call in calls:
        if not _joins(call):
            items.append(call)
        elif id(call) not in has_predecessor:
            chain = [call]
            while successor[id(chain[-1])] is not None:
                chain.append(successor[id(chain[-1])])
            items.append(chain[0] if len(chain) == 1 else Group(tuple(chain)))
    return items


def _joins(call: Call) -> bool:
    """Whether a call may join a group: a plain block below DENSE_MIN_BLOCK positions."""
    return call.band is None and (call.q.stop - call.q.start) * (call.k.stop - call.k.start) < DENSE_MIN_BLOCK


def call_forward(q, k, v, call: Call, *, scale: float, kernel: str, groups: HeadGroups = ALL_HEADS):
    """(out, lse) of one dense call on its q, k, v: a band (window.py) or a block kernel (kernels.py) over `groups`
    of heads (Note [Attention head groups])."""
    if call.band is not None:
        return band_forward(q, k, v, offset=call.band[0], window=call.band[1], scale=scale)
    return block_forward(q, k, v, causal=call.causal, scale=scale, kernel=kernel, groups=groups)


def call_backward(dout, q, k, v, out, lse, call: Call, *, scale: float, kernel: str, grad_dtype=None,
                  groups: HeadGroups = ALL_HEADS):
    """(dq, dk, dv) of one dense call given the final output and log-sum-exp of its rows."""
    if call.band is not None:
        return band_backward(dout, q, k, v, out, lse, offset=call.band[0], window=call.band[1], scale=scale,
                             grad_dtype=grad_dtype)
    return block_backward(dout, q, k, v, out, lse, causal=call.causal, scale=scale, kernel=kernel,
                          grad_dtype=grad_dtype, groups=groups)


def item_forward(q, k, v, rows: slice, item: Call | Group, *, scale: float, kernel: str,
                 groups: HeadGroups = ALL_HEADS):
    """Yield (q index, out, lse) for a Call or Group over batch rows `rows`: out (b, Hq, Lq, D), lse (b, Hq, Lq)."""
    if isinstance(item, Group) and _uses_varlen(q, kernel):
        try:  # every row first, so that a refusal leaves nothing half-merged
            results = [_varlen_forward(q[b], k[b], v[b], item, scale, groups) for b in range(rows.start, rows.stop)]
        except RuntimeError as error:
            _refuse(error)
        else:
            for b, (out, lse) in zip(range(rows.start, rows.stop), results):
                yield (slice(b, b + 1), slice(None), item.q), out.transpose(0, 1)[None], lse[None]
            return
    for call in item.calls if isinstance(item, Group) else (item,):
        index = (rows, slice(None), call.q)
        yield index, *call_forward(q[index], k[rows, :, call.k], v[rows, :, call.k], call, scale=scale, kernel=kernel,
                                   groups=groups)


def item_backward(dout, q, k, v, out, lse, rows: slice, item: Call | Group, *, scale: float, kernel: str,
                  grad_dtype=None, groups: HeadGroups = ALL_HEADS):
    """Yield (q index, k index, dq, dk, dv) for a Call or Group over batch rows `rows` (kernels.block_backward's
    contract: gradients in `grad_dtype`, by default the accumulation dtype)."""
    if isinstance(item, Group) and _uses_varlen(q, kernel):
        dtype = grad_dtype or accumulation_dtype(q.dtype)
        try:  # every row first, so that a refusal leaves nothing half-accumulated
            results = [_varlen_backward(dout[b], q[b], k[b], v[b], out[b], lse[b], item, scale, groups, dtype)
                       for b in range(rows.start, rows.stop)]
        except RuntimeError as error:
            _refuse(error)
        else:
            for b, (dq, dk, dv) in zip(range(rows.start, rows.stop), results):
                yield (slice(b, b + 1), slice(None), item.q), (slice(b, b + 1), slice(None), item.k), dq, dk, dv
            return
    for call in item.calls if isinstance(item, Group) else (item,):
        iq, ik = (rows, slice(None), call.q), (rows, slice(None), call.k)
        yield iq, ik, *call_backward(dout[iq], q[iq], k[ik], v[ik], out[iq], lse[iq], call, scale=scale,
                                     kernel=kernel, grad_dtype=grad_dtype, groups=groups)


def _uses_varlen(q: torch.Tensor, kernel: str) -> bool:
    return (kernel == "sdpa" and q.is_cuda and q.dtype in CUDA_DTYPES and not _varlen_refused
            and hasattr(aten, "_flash_attention_forward"))


def _refuse(error: RuntimeError) -> None:
    """The varlen op failed (a build without it, a head size it does not take): run groups per segment from now on."""
    _varlen_refused.append(str(error))
    warnings.warn(f"longseq: FlashAttention's variable-length kernel failed ({str(error)[:200]}); packed documents "
                  "run one dense kernel call per segment from now on.", stacklevel=3)


def _cumulative(group: Group, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    q_lengths = tuple(c.q.stop - c.q.start for c in group.calls)
    k_lengths = tuple(c.k.stop - c.k.start for c in group.calls)
    cu_q, cu_k = _device_offsets(q_lengths, k_lengths, device)
    return cu_q, cu_k, max(q_lengths), max(k_lengths)


@functools.lru_cache(maxsize=256)
def _device_offsets(q_lengths: tuple[int, ...], k_lengths: tuple[int, ...], device) -> tuple[torch.Tensor, ...]:
    """cu_seqlens of q and k (int32, on `device`), once per group shape: every layer reuses them."""
    offsets = torch.tensor([[0, 0], *zip(q_lengths, k_lengths)], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    offsets = offsets.to(device)
    return offsets[:, 0].contiguous(), offsets[:, 1].contiguous()


def _tokens(x: torch.Tensor, positions: slice) -> torch.Tensor:
    """(H, L, D) of one row → (tokens, H, D) over `positions`, a view where the head dimension is dense (the kernel
    takes any token and head strides)."""
    view = x[:, positions].transpose(0, 1)
    return view if view.stride(-1) == 1 else view.contiguous()


def _varlen_forward(q, k, v, group: Group, scale: float, groups: HeadGroups):
    """q (Hq, Lq, D), k/v (Hkv, Lk, D) of one row → out (Lq_group, Hq, D), lse (Hq, Lq_group) in fp32; one kernel
    call per head call of `groups` (the kernel takes GQA's K/V heads as they are)."""
    cu = _cumulative(group, q.device)
    tq, tk, tv = _tokens(q, group.q), _tokens(k, group.k), _tokens(v, group.k)
    calls = _head_calls(groups, tq, tk)
    if len(calls) == 1:
        return _varlen_call(tq, tk, tv, cu, group.causal, scale)
    out, lse = torch.empty_like(tq), None
    for call in calls:
        call_out, call_lse = _varlen_call(tq[:, call.q], tk[:, call.kv], tv[:, call.kv], cu, group.causal, scale)
        if lse is None:
            lse = call_lse.new_empty(tq.shape[1], tq.shape[0])
        out[:, call.q], lse[call.q] = call_out, call_lse
    return out, lse


def _varlen_call(tq, tk, tv, cu, causal: bool, scale: float):
    cu_q, cu_k, max_q, max_k = cu
    out, lse, *_ = aten._flash_attention_forward(tq, tk, tv, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                 scale=scale)
    if lse.shape != (tq.shape[1], tq.shape[0]):
        raise RuntimeError(f"unexpected log-sum-exp shape {tuple(lse.shape)} from the varlen kernel (older layout)")
    return out, lse


def _varlen_backward(dout, q, k, v, out, lse, group: Group, scale: float, groups: HeadGroups, dtype: torch.dtype):
    """Gradients of one row's group in `dtype`, laid out (1, H, L_group, D) like a block kernel's: dq over Hq heads,
    dk/dv over Hkv; head calls as in _varlen_forward, a split K/V head's dk/dv summed over its calls in fp32."""
    cu = _cumulative(group, q.device)
    tq, tk, tv = _tokens(q, group.q), _tokens(k, group.k), _tokens(v, group.k)
    t_dout, t_out, t_lse = _tokens(dout, group.q), _tokens(out, group.q), lse[:, group.q]
    calls = _head_calls(groups, tq, tk)
    dq, kv_grads = torch.empty_like(_as_block(tq), dtype=dtype), KVGradients(_as_block(tk), _as_block(tv), dtype)
    for call in calls:
        heads = slice(None), call.q
        gq, gk, gv = _varlen_call_backward(t_dout[heads], tq[heads], tk[:, call.kv], tv[:, call.kv], t_out[heads],
                                           t_lse[call.q], cu, group.causal, scale)
        dq[:, call.q] = _as_block(gq)
        kv_grads.add(call, _as_block(gk), _as_block(gv))  # gk, gv already over the call's K/V heads: no folding
    return dq, kv_grads.dk, kv_grads.dv


def _varlen_call_backward(t_dout, tq, tk, tv, t_out, t_lse, cu, causal: bool, scale: float):
    cu_q, cu_k, max_q, max_k = cu
    rng = torch.zeros(1, dtype=torch.int64, device=tq.device)  # dropout seed and offset: unread without dropout
    return aten._flash_attention_backward(t_dout, tq, tk, tv, t_out, t_lse.contiguous(), cu_q, cu_k, max_q, max_k,
                                          0.0, causal, rng, rng, scale=scale)


def _head_calls(groups: HeadGroups, tq: torch.Tensor, tk: torch.Tensor) -> list[HeadCall]:
    """The head calls of `groups` for a group's tokens (tokens, H, D), sized as a block of that many tokens."""
    return groups.calls(_as_block(tq), _as_block(tk))


def _as_block(t: torch.Tensor) -> torch.Tensor:
    """(tokens, H, D) → a (1, H, tokens, D) view, the layout of the block kernels."""
    return t.transpose(0, 1)[None]
