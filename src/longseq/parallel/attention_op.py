"""Note [Attention as one operator]

What longseq's block-kernel attention does between the Ulysses exchanges depends on the data: the document boundaries
are read on the host from the gathered position_ids, the ring plan is Python over them, the ring exchanges are
point-to-point calls, and the attention cache (Note [Attention output cache]) decides on the host whether to compute
at all. Traced by torch.compile, each of these breaks the graph, and the plan's lists would become guards, so every
new packing of documents would recompile. So under torch.compile that part is one custom operator,
`longseq::block_attention` (q, k, v, position_ids, sinks → out, lse), with its backward another,
`longseq::block_attention_backward`; inside, they run eagerly what ring_attention runs. The compiler sees shapes
only; the Ulysses exchanges around the operator (all-to-all autograd Functions) trace as functional collectives, and
with a ring the batch moves to Note [Document placement] through a third operator (`longseq::place_documents`,
models/apply.py). Eager runs call the same functions directly (torch.compiler.is_compiling() tells the two apart).

The operators find the model's documents, mesh and attention cache through the name of its registered attention
function (a constant of the graph). Their outputs have fixed layouts, as compiled code expects: out (B, S, H, D) and
the gradients (B, H, S, D), contiguous.

Where the graph still breaks (torch.compile(fullgraph=True) refuses them; without fullgraph they run eagerly between
compiled pieces, with the same results): the other attention paths (FlexAttention's BlockMask, SDPA with a sliding
window or dropout, flash-attention kernels) read the documents on the host; checkpoint offload's saved-tensor hooks are
not traceable (a break at each decoder layer); the tiled MLP, norms and loss (memory/) call torch.autograd.grad in
their backward, which dynamo does not trace by default. tests/test_compile.py checks fullgraph at sp = 2 (Ulysses and
ring, packed rows, no recompile for a new packing) and the broken graphs at sp = 1 and 2 with the memory features.
"""

from __future__ import annotations

import weakref

import torch

from longseq.parallel.documents import is_single_document
from longseq.parallel.merge import accumulation_dtype
from longseq.parallel.ring import ring_attention, ring_attention_backward, ring_attention_forward, ring_plan
from longseq.parallel.sinks import sink_gradient
from longseq.state import LongseqState

_STATES: dict[str, weakref.ref] = {}


def register_state(name: str, state: LongseqState) -> None:
    """Let the operators find `state` (documents, mesh, attention cache) by its attention function's name."""
    _STATES[name] = weakref.ref(state)


def state_of(name: str) -> LongseqState:
    held = _STATES.get(name, lambda: None)()
    if held is None:
        raise RuntimeError(f"longseq: attention {name!r} belongs to a model that no longer exists.")
    return held


def block_attention(q, k, v, position_ids, *, name: str, scale: float, kernel: str, window: int | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """longseq's block kernels over the model's ring (R = 1: none) for head-split q, k, v (B, H, S, D), with a
    sliding window and (H,) sink logits (ring.ring_attention's), → out (B, S, H, D); differentiable w.r.t. q, k, v
    and the sinks. Eager runs call ring_attention itself (the same code the operators run, with no operator in
    between: tools that watch ATen ops, such as bench/live_bytes.py, see every buffer)."""
    if torch.compiler.is_compiling():
        out, _ = torch.ops.longseq.block_attention(q, k, v, position_ids, sinks, name, scale, kernel, window)
        return out
    state = state_of(name)
    boundaries, layouts = state.documents.lookup(position_ids)
    out = ring_attention(state.documents.mesh.ring_group, q, k, v, scale=scale, kernel=kernel, layouts=layouts,
                         boundaries=None if is_single_document(boundaries) else boundaries,
                         cache=state.attention_cache, window=window, sinks=sinks)
    return out.transpose(1, 2)


def _plan(state: LongseqState, q, k, v, position_ids, kernel: str, window: int | None, sinks):
    boundaries, layouts = state.documents.lookup(position_ids)
    return ring_plan(state.documents.mesh.ring_group, q, k, v, kernel=kernel, layouts=layouts, window=window,
                     sinks=sinks, boundaries=None if is_single_document(boundaries) else boundaries)


@torch.library.custom_op("longseq::block_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, sinks: torch.Tensor | None,
             name: str, scale: float, kernel: str, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    state = state_of(name)
    plan = _plan(state, q, k, v, position_ids, kernel, window, sinks)
    group = state.documents.mesh.ring_group

    def compute():
        out, lse = ring_attention_forward(group, q, k.contiguous(), v.contiguous(), scale=scale, plan=plan,
                                          kernel=kernel, sinks=sinks)
        return out.transpose(1, 2).contiguous(), lse.contiguous()

    cache = state.attention_cache
    return compute() if cache is None else cache(compute)


@_forward.register_fake
def _(q, k, v, position_ids, sinks, name, scale, kernel, window):
    batch, heads, length, dim = q.shape
    return q.new_empty(batch, length, heads, dim), q.new_empty(batch, heads, length, dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("longseq::block_attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, position_ids: torch.Tensor, sinks: torch.Tensor | None, name: str, scale: float,
                 kernel: str, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (B, H, S, D) and the sinks' gradient (empty without sinks)."""
    state = state_of(name)
    plan = _plan(state, q, k, v, position_ids, kernel, window, sinks)
    dout, out = dout.transpose(1, 2), out.transpose(1, 2)
    grads = ring_attention_backward(state.documents.mesh.ring_group, dout, q, k.contiguous(), v.contiguous(), out,
                                    lse, scale=scale, plan=plan, kernel=kernel)
    dsinks = q.new_empty(0) if sinks is None else sink_gradient(dout, out, lse, sinks)
    return *(g.contiguous() for g in grads), dsinks


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, position_ids, sinks, name, scale, kernel, window):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return *(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)), dsinks


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, position_ids, sinks, ctx.name, ctx.scale, ctx.kernel, ctx.window = inputs
    ctx.save_for_backward(q, k, v, *output, position_ids, sinks)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, position_ids, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.longseq.block_attention_backward(dout, q, k, v, out, lse, position_ids, sinks,
                                                                    ctx.name, ctx.scale, ctx.kernel, ctx.window)
    return dq, dk, dv, None, dsinks if ctx.needs_input_grad[4] else None, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)
