r"""Note [Ring attention]

Exact causal attention over a sequence sharded across the R ranks of a ring, in the zigzag layout of
Note [Zigzag placement] (balance.py): the sequence is cut into 2R chunks of c = S_local / 2 tokens and ring rank r holds
chunks r and 2R−1−r. Each rank keeps its queries; the K/V of every rank travel once around the ring (send to r+1,
receive from r−1), so at step s rank r holds the K/V of rank (r − s) mod R. The exchange for step s+1 is posted before
the blocks of step s are computed and waited for after, so communication overlaps compute.

A (q chunk i, k chunk j) block is skipped if j > i, a causal square if j = i, and full (unmasked) if j < i. For R = 2,
"r.s" marks the rank r and step s that compute a block ( \ causal square, # full, . skipped):

                k chunk:   0      1      2      3
        q chunk 0        0.0\    .      .      .          rank 0 holds q chunks 0, 3
        q chunk 1        1.1#   1.0\    .      .          rank 1 holds q chunks 1, 2
        q chunk 2        1.1#   1.0#   1.0\    .
        q chunk 3        0.0#   0.1#   0.1#   0.0\

Every rank computes two c×c blocks' worth per step: its own two causal squares plus one full block at step 0, then
either both its q chunks against the sender's early chunk (sender < r) or its late q chunk against both of the
sender's chunks (sender > r).

Packed documents (contiguous global ranges; a token attends to earlier tokens of its own document) need no mask:
- a causal square is cut into the document segments inside the chunk, one causal square each;
- a full block (k chunk j strictly before q chunk i) meets at most one document, the one holding the last token of
  k chunk j, and only if it reaches into q chunk i. Then its q tokens (a prefix of chunk i) attend to its k tokens
  (a suffix of chunk j), unmasked; every other q row gets nothing from this block.

        k chunk j: [ x x x | y y y y y ]          q chunk i: [ y y y | z z z z z ]
        block computed: q rows of y (prefix of i) × k columns of y (suffix of j)

Each block returns (out, lse); the exact merge (merge.py) keeps an fp32 accumulator, where lse = −inf means "no key
yet". Every token sees at least itself, so no row ends with −inf.

Backward (flash style): with the final merged output O and log-sum-exp L saved, the gradient of each block follows
from that block alone (probabilities exp(q·kᵀ·scale − L), rowsum(dO·O)); no second forward pass. K/V rotate again;
dq accumulates locally, and the fp32 dk/dv of the K/V a rank holds travel with them: received from r−1, increased by
this rank's blocks, sent to r+1. After R steps they are back home. Forward: R−1 exchanges; backward: R−1 for K/V and
R for dk/dv.

Sliding windows cut blocks further (Note [Sliding windows on blocks], window.py): blocks out of reach are skipped,
blocks the window cuts run as bands. A sink merges into the final (out, lse) like one more key (Note [Attention
sinks], sinks.py).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longseq.parallel.balance import Layout, zigzag_layout
from longseq.parallel.kernels import KERNELS
from longseq.parallel.merge import accumulation_dtype, merge_, new_accumulators
from longseq.parallel.sinks import merge_sink, sink_gradient
from longseq.parallel.varlen import Call, Group, call_backward, call_forward, group_calls, item_backward, item_forward
from longseq.parallel.window import window_cut

_KV_TAG, _GRAD_TAG = 0, 1  # distinct tags keep the two streams apart on gloo (NCCL keeps them in posting order)


@dataclass(frozen=True)
class _Chunk:
    start: int  # global token offset
    local: int  # offset in its rank's portion
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class _Run:
    """Consecutive batch rows with the same documents and layout, and their kernel calls per ring step."""

    rows: slice
    steps: tuple[tuple[Call | Group, ...], ...]


def ring_attention(
    group, q, k, v, *, scale: float, boundaries: list[list[int]] | None = None, layouts: list[Layout] | None = None,
    kernel: str = "sdpa", cache=None, window: int | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact causal (and within-document) attention over a ring of ranks; see Note [Ring attention].

    q: (B, Hq, S_local, D); k, v: (B, Hkv, S_local, D) with Hq % Hkv == 0 (GQA), all in the zigzag layout of
    balance.py (ring rank r holds global chunks r and 2R−1−r of the full sequence of length S = R · S_local), or in
    the given `layouts`.
    group: the ring's process group; None means no ring (R = 1, plain local causal attention).
    boundaries: per batch row, global document start offsets plus S at the end (documents.document_boundaries of the
        FULL sequence's position_ids); None = one causal document per row.
    layouts: per batch row, the chunks of the full row each ring rank holds, in local order (balance.Layout, e.g.
        Note [Document placement]); None = zigzag.
    kernel: the block kernels, "sdpa" (cuDNN/flash ops) or "flex" (FlexAttention); see kernels.py.
    cache: None, or a compute-or-replay function `cache(compute) -> (out, lse)` that returns compute() or a pair
        computed earlier for these same inputs (the checkpoint recompute's, Note [Attention output cache]); backward
        uses whatever pair it returns.
    window: sliding window w (query i sees key j when 0 <= i − j < w); None: full causal attention.
    sinks: (Hq,) attention-sink logits of these heads (Note [Attention sinks]), differentiable; None: no sinks.
    Returns (B, Hq, S_local, D) in q's dtype, differentiable w.r.t. q, k, v.
    """
    plan = ring_plan(group, q, k, v, boundaries=boundaries, layouts=layouts, kernel=kernel, window=window,
                     sinks=sinks)
    return RingAttentionFunction.apply(group, q, k.contiguous(), v.contiguous(), scale, plan, kernel, cache, sinks)


def ring_plan(group, q, k, v, *, boundaries=None, layouts=None, kernel: str = "sdpa", window: int | None = None,
              sinks: torch.Tensor | None = None) -> tuple[_Run, ...]:
    """Check ring_attention's inputs and return this rank's kernel calls per ring step (computed once per forward
    pass: every layer asks for the same)."""
    ring_size = _ring_size(group)
    _check_inputs(q, k, v, ring_size, boundaries, layouts)
    if kernel not in KERNELS:
        raise ValueError(f"ring_attention: kernel={kernel!r} is not one of {KERNELS}.")
    if window is not None and window < 1:
        raise ValueError(f"ring_attention: window={window} must be a positive number of tokens (or None).")
    if sinks is not None and sinks.shape != (q.shape[1],):
        raise ValueError(f"ring_attention: sinks of shape {tuple(sinks.shape)} must hold one logit per query head "
                         f"({q.shape[1]},).")
    rank = 0 if group is None else dist.get_rank(group)
    return _plan(boundaries, layouts, q.shape[0], q.shape[2], ring_size, rank, window)


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, q, k, v, scale, plan, kernel, cache, sinks):
        def compute():
            return ring_attention_forward(group, q, k, v, scale=scale, plan=plan, kernel=kernel, sinks=sinks)

        out, lse = compute() if cache is None else cache(compute)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.group, ctx.scale, ctx.plan, ctx.kernel = group, scale, plan, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(ctx.group, dout, q, k, v, out, lse, scale=ctx.scale, plan=ctx.plan,
                                            kernel=ctx.kernel)
        dsinks = sink_gradient(dout, out, lse, sinks) if ctx.needs_input_grad[8] else None
        return None, dq, dk, dv, None, None, None, None, dsinks


def ring_attention_forward(group, q, k, v, *, scale: float, plan: tuple[_Run, ...], kernel: str = "sdpa", sinks=None):
    """Output (q's dtype) and fp32 log-sum-exp (B, Hq, S_local) of the rank's queries over the whole ring (and the
    sinks, if any)."""
    if _ring_size(group) == 1:
        out, lse = _local_forward(q, k, v, scale, plan, kernel)
        return (out, lse) if sinks is None else merge_sink(out, lse, sinks)
    ring = _Ring(group)
    steps = len(plan[0].steps)
    out, lse = new_accumulators(q)
    held = (k, v)
    for step in range(steps):
        pending = ring.start(held, _KV_TAG) if step < steps - 1 else None
        for rows, item in _items(plan, step):
            for iq, block_out, block_lse in item_forward(q, *held, rows, item, scale=scale, kernel=kernel):
                merge_(out[iq], lse[iq], block_out, block_lse)
        if pending is not None:
            held = _Ring.finish(pending)
    if sinks is not None:
        out, lse = merge_sink(out, lse, sinks)
    return out.to(q.dtype), lse


def ring_attention_backward(
    group, dout, q, k, v, out, lse, *, scale: float, plan: tuple[_Run, ...], kernel: str = "sdpa"
):
    """Gradients w.r.t. q, k, v given the final output and log-sum-exp; see Note [Ring attention]."""
    if _ring_size(group) == 1:
        return _local_backward(dout, q, k, v, out, lse, scale, plan, kernel)
    ring = _Ring(group)
    steps = len(plan[0].steps)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    held, grads_pending = (k, v), None
    for step in range(steps):
        kv_pending = ring.start(held, _KV_TAG) if step < steps - 1 else None
        dk, dv = (torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2))
        for rows, item in _items(plan, step):
            for iq, ik, gq, gk, gv in item_backward(dout, q, *held, out, lse, rows, item, scale=scale, kernel=kernel):
                dq[iq] += gq
                dk[ik] += gk
                dv[ik] += gv
        if grads_pending is not None:  # the dk/dv of these K/V from the ranks before us
            earlier = _Ring.finish(grads_pending)
            dk += earlier[0]
            dv += earlier[1]
        grads_pending = ring.start((dk, dv), _GRAD_TAG)
        if kv_pending is not None:
            held = _Ring.finish(kv_pending)
    dk, dv = _Ring.finish(grads_pending)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _items(plan: tuple[_Run, ...], step: int):
    """(batch rows, kernel call or group) of every item of a ring step."""
    for run in plan:
        for item in run.steps[step]:
            yield run.rows, item


# Without a ring (R = 1) the kernel calls of a run cover each query and key position exactly once (one causal square
# per document), so results are written in place: no merge, no fp32 accumulators (at long lengths those would cost
# 3 × 4 bytes per head dimension per token).

def _covered_by_one_call(plan: tuple[_Run, ...]) -> bool:
    (first,) = plan[0].steps
    return len(plan) == 1 and len(first) == 1 and isinstance(first[0], Call)


def _local_forward(q, k, v, scale: float, plan: tuple[_Run, ...], kernel: str):
    if _covered_by_one_call(plan):  # one document per row: no copy either
        return call_forward(q, k, v, plan[0].steps[0][0], scale=scale, kernel=kernel)
    # Laid out as (B, S, H, D) like the model's own projections, so the caller's transpose back is free.
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(q.shape[:-1], dtype=accumulation_dtype(q.dtype), device=q.device)
    for rows, item in _items(plan, 0):
        for iq, block_out, block_lse in item_forward(q, k, v, rows, item, scale=scale, kernel=kernel):
            out[iq], lse[iq] = block_out, block_lse
    return out, lse


def _local_backward(dout, q, k, v, out, lse, scale: float, plan: tuple[_Run, ...], kernel: str):
    if _covered_by_one_call(plan):
        return call_backward(dout, q, k, v, out, lse, plan[0].steps[0][0], scale=scale, kernel=kernel,
                             grad_dtype=q.dtype)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    for rows, item in _items(plan, 0):
        for iq, ik, gq, gk, gv in item_backward(dout, q, k, v, out, lse, rows, item, scale=scale, kernel=kernel,
                                                grad_dtype=q.dtype):
            dq[iq], dk[ik], dv[ik] = gq, gk, gv
    return dq, dk, dv


class _Ring:
    """Point-to-point rotation: send to ring rank + 1, receive from ring rank − 1."""

    def __init__(self, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def start(self, tensors, tag: int):
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in received]
        # The sent tensors ride along so they stay alive until the requests complete.
        return dist.batch_isend_irecv(ops), tensors, received

    @staticmethod
    def finish(pending) -> list[torch.Tensor]:
        requests, _, received = pending
        for request in requests:
            request.wait()
        return received


def _ring_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _plan(boundaries, layouts, batch: int, local_len: int, ring_size: int, rank: int,
          window: int | None = None) -> tuple[_Run, ...]:
    """Kernel calls per ring step, shared by the rows of each run of identical documents and layouts."""
    total = ring_size * local_len
    bounds = ((0, total),) * batch if boundaries is None else tuple(tuple(row) for row in boundaries)
    rows_layouts = (None,) * batch if layouts is None else tuple(layouts)
    return _cached_plan(bounds, rows_layouts, local_len, ring_size, rank, window)


@functools.lru_cache(maxsize=64)
def _cached_plan(bounds, layouts, local_len: int, ring_size: int, rank: int, window) -> tuple[_Run, ...]:
    """Every layer of a forward pass asks for the same plan: it is computed once."""
    keys = [(b, layout or zigzag_layout(local_len * ring_size, ring_size)) for b, layout in zip(bounds, layouts)]
    runs, first = [], 0
    for row in range(1, len(keys) + 1):
        if row == len(keys) or keys[row] != keys[first]:
            runs.append(_Run(slice(first, row), _run_steps(*keys[first], ring_size, rank, window)))
            first = row
    return tuple(runs)


def _run_steps(bounds, layout: Layout, ring_size: int, rank: int,
               window: int | None) -> tuple[tuple[Call | Group, ...], ...]:
    mine = _chunks(layout[rank])
    steps = []
    for step in range(ring_size):
        held = _chunks(layout[(rank - step) % ring_size])
        ends = [c.end for c in held]
        calls = [call for qc in mine for call in _chunk_calls(bounds, qc, held, ends, window)]
        steps.append(tuple(group_calls(_coalesce(calls))))
    return tuple(steps)


def _chunks(portion) -> tuple[_Chunk, ...]:
    """A portion's chunks with their local offsets, sorted by global start."""
    chunks, local = [], 0
    for start, length in portion:
        chunks.append(_Chunk(start, local, length))
        local += length
    return tuple(sorted(chunks, key=lambda c: c.start))


def _chunk_calls(bounds, qc: _Chunk, held: tuple[_Chunk, ...], ends: list[int], window: int | None) -> list[Call]:
    """The kernel calls of q chunk `qc` against the held k chunks (sorted by start, `ends` their ends) that can reach
    it: those ending inside or after the document holding qc's first token, and starting no later than qc; each as
    the sliding window cuts it."""
    doc_start = bounds[bisect.bisect_right(bounds, qc.start) - 1]
    first = bisect.bisect_right(ends, doc_start)
    calls = []
    for kc in held[first:]:
        if kc.start > qc.start:
            break
        calls += [cut for call in _pair_calls(bounds, qc, kc) if (cut := _in_window(call, qc, kc, window)) is not None]
    return calls


def _pair_calls(bounds, qc: _Chunk, kc: _Chunk) -> list[Call]:
    """The kernel calls of one (q chunk, k chunk) block under the documents `bounds`; see Note [Ring attention]."""
    if kc.start > qc.start:
        return []
    if kc.start == qc.start:
        return [
            Call(slice(qc.local + a - qc.start, qc.local + b - qc.start),
                 slice(kc.local + a - kc.start, kc.local + b - kc.start), True)
            for a, b in _segments(bounds, qc.start, qc.end)
        ]
    doc = bisect.bisect_right(bounds, kc.end - 1) - 1
    doc_start, doc_end = bounds[doc], bounds[doc + 1]
    if doc_end <= qc.start:
        return []
    q_len = min(doc_end, qc.end) - qc.start
    k_from = max(doc_start, kc.start) - kc.start
    return [Call(slice(qc.local, qc.local + q_len), slice(kc.local + k_from, kc.local + kc.length), False)]


def _in_window(call: Call, qc: _Chunk, kc: _Chunk, window: int | None) -> Call | None:
    """The call as the sliding window cuts it: skipped (None), whole, or a band (Note [Sliding windows on blocks])."""
    if window is None:
        return call
    q0, k0 = qc.start + call.q.start - qc.local, kc.start + call.k.start - kc.local
    cut = window_cut(q0, call.q.stop - call.q.start, k0, call.k.stop - call.k.start, call.causal, window)
    if cut is None or cut == "whole":
        return None if cut is None else call
    q_stop, k_start, offset = cut
    return Call(slice(call.q.start, call.q.start + q_stop), slice(call.k.start + k_start, call.k.stop), False,
                (offset, window))


def _segments(bounds, lo: int, hi: int):
    """The pieces [a, b) of documents that lie inside the token range [lo, hi)."""
    i = bisect.bisect_right(bounds, lo) - 1
    while bounds[i] < hi:
        yield max(bounds[i], lo), min(bounds[i + 1], hi)
        i += 1


def _coalesce(calls: list[Call]) -> list[Call]:
    """Join neighbouring full blocks that share their q or k range into one kernel call."""
    joined: list[Call] = []
    for call in calls:
        prev = joined[-1] if joined else None
        if prev is not None and not (prev.causal or call.causal or prev.band or call.band):
            if prev.k == call.k and prev.q.stop == call.q.start:
                joined[-1] = Call(slice(prev.q.start, call.q.stop), prev.k, False)
                continue
            if prev.q == call.q and prev.k.stop == call.k.start:
                joined[-1] = Call(prev.q, slice(prev.k.start, call.k.stop), False)
                continue
        joined.append(call)
    return joined


def _check_inputs(q, k, v, ring_size: int, boundaries, layouts) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"ring_attention: expected q (B, Hq, S_local, D) and k, v (B, Hkv, S_local, D) of one shape, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    batch, heads, local_len, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, local_len, dim):
        raise ValueError(
            f"ring_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, S_local and head_dim "
            "(dims 0, 2, 3); pass them as (batch, heads, tokens, head_dim)."
        )
    if heads % k.shape[1]:
        raise ValueError(
            f"ring_attention: Hq = {heads} query heads is not a multiple of Hkv = {k.shape[1]} key/value heads; "
            "GQA needs Hq % Hkv == 0 (check num_attention_heads and num_key_value_heads)."
        )
    if ring_size > 1 and local_len % 2 and layouts is None:
        raise ValueError(
            f"ring_attention: S_local = {local_len} is odd, but the zigzag layout gives every rank two equal chunks. "
            f"Pad the full sequence to a multiple of 2·R = {2 * ring_size} tokens before sharding (balance.py)."
        )
    if boundaries is not None:
        _check_boundaries(boundaries, batch, ring_size, local_len)
    if layouts is not None:
        _check_layouts(layouts, batch, ring_size, local_len)


def _check_layouts(layouts, batch: int, ring_size: int, local_len: int) -> None:
    if len(layouts) != batch or any(len(layout) != ring_size for layout in layouts):
        raise ValueError(
            f"ring_attention: layouts must hold one layout per batch row ({batch}) with one portion per ring rank "
            f"({ring_size}); got {len(layouts)} rows. Build them with balance.document_layout."
        )
    for i, layout in enumerate(layouts):
        covered = sorted(chunk for portion in layout for chunk in portion)
        if any(sum(n for _, n in portion) != local_len for portion in layout) or \
                any(a[0] + a[1] != b[0] for a, b in zip(covered, covered[1:])) or covered[0][0] != 0:
            raise ValueError(
                f"ring_attention: layouts[{i}] does not give every ring rank S_local = {local_len} tokens of one "
                "row without gaps or overlaps; build it with balance.document_layout from the row's boundaries."
            )


def _check_boundaries(boundaries, batch: int, ring_size: int, local_len: int) -> None:
    total = ring_size * local_len
    if len(boundaries) != batch:
        raise ValueError(
            f"ring_attention: boundaries has {len(boundaries)} rows for a batch of {batch}; pass one list per row."
        )
    for i, row in enumerate(boundaries):
        if row[-1] != total:
            raise ValueError(
                f"ring_attention: boundaries[{i}] ends at {row[-1]}, but the full sequence has R·S_local = "
                f"{ring_size}·{local_len} = {total} tokens. Compute boundaries from the FULL sequence's position_ids "
                "(documents.document_boundaries), not from this rank's slice."
            )
        if row[0] != 0 or any(a >= b for a, b in zip(row, row[1:])):
            raise ValueError(
                f"ring_attention: boundaries[{i}] = {row} must start at 0 and increase strictly "
                "(document starts, then the sequence length)."
            )
