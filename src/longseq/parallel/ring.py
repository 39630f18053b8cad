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

Packed documents need no mask: they cut the blocks into kernel calls (Note [Ring plan], ring_plan.py).

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

import functools
import weakref

import torch
import torch.distributed as dist

from longseq.parallel.balance import Layout
from longseq.parallel.head_groups import ALL_HEADS, HeadGroups
from longseq.parallel.merge import accumulation_dtype, merge_, new_accumulators
from longseq.parallel.ring_plan import Run, ring_plan, ring_size_of
from longseq.parallel.sinks import merge_sink, sink_gradient
from longseq.parallel.varlen import Call, call_backward, call_forward, item_backward, item_forward

_KV_TAG, _GRAD_TAG = 0, 1  # distinct tags keep the two streams apart on gloo (NCCL keeps them in posting order)


def ring_attention(
    group, q, k, v, *, scale: float, boundaries: list[list[int]] | None = None, layouts: list[Layout] | None = None,
    kernel: str = "sdpa", cache=None, window: int | None = None, sinks: torch.Tensor | None = None,
    groups: HeadGroups = ALL_HEADS,
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
        uses whatever pair it returns. If it has a method `backward_done()`, it is called once backward has used
        and released this call's saved tensors (a hook on q's gradient; the cache then starts bringing back what the
        layer before needs), unless the method's object is gone by then (the hook holds it weakly).
    window: sliding window w (query i sees key j when 0 <= i − j < w); None: full causal attention.
    sinks: (Hq,) attention-sink logits of these heads (Note [Attention sinks]), differentiable; None: no sinks.
    groups: how many heads one kernel call takes (Note [Attention head groups], head_groups.py).
    Returns (B, Hq, S_local, D) in q's dtype, differentiable w.r.t. q, k, v.
    """
    plan = ring_plan(group, q, k, v, boundaries=boundaries, layouts=layouts, kernel=kernel, window=window,
                     sinks=sinks)
    k, v = sendable(group, k, v)
    done = getattr(cache, "backward_done", None)
    if done is not None and q.requires_grad and torch.is_grad_enabled():
        # Runs when q's gradient reaches q's own node: after this call's backward, whose saved tensors are gone then.
        # The hook stays on that node as long as the graph does (after backward too, while the loss is alive), so it
        # holds the cache weakly: a strong reference would keep the cache's kept outputs alive with it.
        q.register_hook(functools.partial(_call_if_alive, weakref.WeakMethod(done)))
    return RingAttentionFunction.apply(group, q, k, v, scale, plan, kernel, cache, sinks, groups)


def _call_if_alive(method: weakref.WeakMethod, grad: torch.Tensor) -> None:
    alive = method()
    if alive is not None:
        alive()


def sendable(group, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v as the ring sends them point to point, which needs dense tensors; as they are without a ring (the
    kernels read strided tensors, Note [Attention head groups])."""
    if ring_size_of(group) > 1:
        return k.contiguous(), v.contiguous()
    return k, v



class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, q, k, v, scale, plan, kernel, cache, sinks, groups):
        def compute():
            return ring_attention_forward(group, q, k, v, scale=scale, plan=plan, kernel=kernel, sinks=sinks,
                                          groups=groups)

        out, lse = compute() if cache is None else cache(compute)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.group, ctx.scale, ctx.plan, ctx.kernel, ctx.groups = group, scale, plan, kernel, groups
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(ctx.group, dout, q, k, v, out, lse, scale=ctx.scale, plan=ctx.plan,
                                            kernel=ctx.kernel, groups=ctx.groups)
        dsinks = sink_gradient(dout, out, lse, sinks) if ctx.needs_input_grad[8] else None
        return None, dq, dk, dv, None, None, None, None, dsinks, None


def ring_attention_forward(group, q, k, v, *, scale: float, plan: tuple[Run, ...], kernel: str = "sdpa", sinks=None,
                           groups: HeadGroups = ALL_HEADS):
    """Output (q's dtype) and fp32 log-sum-exp (B, Hq, S_local) of the rank's queries over the whole ring (and the
    sinks, if any)."""
    if ring_size_of(group) == 1:
        out, lse = _local_forward(q, k, v, scale, plan, kernel, groups)
        return (out, lse) if sinks is None else merge_sink(out, lse, sinks)
    ring = _Ring(group)
    steps = len(plan[0].steps)
    out, lse = new_accumulators(q)
    held = (k, v)
    for step in range(steps):
        pending = ring.start(held, _KV_TAG) if step < steps - 1 else None
        for rows, item in _items(plan, step):
            for iq, block_out, block_lse in item_forward(q, *held, rows, item, scale=scale, kernel=kernel,
                                                                groups=groups):
                merge_(out[iq], lse[iq], block_out, block_lse)
        if pending is not None:
            held = _Ring.finish(pending)
    if sinks is not None:
        out, lse = merge_sink(out, lse, sinks)
    return out.to(q.dtype), lse


def ring_attention_backward(
    group, dout, q, k, v, out, lse, *, scale: float, plan: tuple[Run, ...], kernel: str = "sdpa",
    groups: HeadGroups = ALL_HEADS,
):
    """Gradients w.r.t. q, k, v given the final output and log-sum-exp; see Note [Ring attention]."""
    if ring_size_of(group) == 1:
        return _local_backward(dout, q, k, v, out, lse, scale, plan, kernel, groups)
    ring = _Ring(group)
    steps = len(plan[0].steps)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    held, grads_pending = (k, v), None
    for step in range(steps):
        kv_pending = ring.start(held, _KV_TAG) if step < steps - 1 else None
        dk, dv = (torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2))
        for rows, item in _items(plan, step):
            for iq, ik, gq, gk, gv in item_backward(dout, q, *held, out, lse, rows, item, scale=scale, kernel=kernel,
                                                        groups=groups):
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


def _items(plan: tuple[Run, ...], step: int):
    """(batch rows, kernel call or group) of every item of a ring step."""
    for run in plan:
        for item in run.steps[step]:
            yield run.rows, item


# Without a ring (R = 1) the kernel calls of a run cover each query and key position exactly once (one causal square
# per document), so results are written in place: no merge, no fp32 accumulators (at long lengths those would cost
# 3 × 4 bytes per head dimension per token).

def _covered_by_one_call(plan: tuple[Run, ...]) -> bool:
    (first,) = plan[0].steps
    return len(plan) == 1 and len(first) == 1 and isinstance(first[0], Call)


def _local_forward(q, k, v, scale: float, plan: tuple[Run, ...], kernel: str, groups: HeadGroups):
    if _covered_by_one_call(plan):  # one document per row: no copy either
        return call_forward(q, k, v, plan[0].steps[0][0], scale=scale, kernel=kernel, groups=groups)
    # Laid out as (B, S, H, D) like the model's own projections, so the caller's transpose back is free.
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(q.shape[:-1], dtype=accumulation_dtype(q.dtype), device=q.device)
    for rows, item in _items(plan, 0):
        for iq, block_out, block_lse in item_forward(q, k, v, rows, item, scale=scale, kernel=kernel, groups=groups):
            out[iq], lse[iq] = block_out, block_lse
    return out, lse


def _local_backward(dout, q, k, v, out, lse, scale: float, plan: tuple[Run, ...], kernel: str,
                    groups: HeadGroups):
    if _covered_by_one_call(plan):
        return call_backward(dout, q, k, v, out, lse, plan[0].steps[0][0], scale=scale, kernel=kernel,
                             grad_dtype=q.dtype, groups=groups)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    for rows, item in _items(plan, 0):
        for iq, ik, gq, gk, gv in item_backward(dout, q, k, v, out, lse, rows, item, scale=scale, kernel=kernel,
                                                grad_dtype=q.dtype, groups=groups):
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
