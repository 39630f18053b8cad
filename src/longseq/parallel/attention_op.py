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
function (a constant of the graph); the head groups (Note [Attention head groups]) are two constants of their own.
Their outputs have fixed layouts, as compiled code expects: out (B, S, H, D) and the gradients (B, H, S, D),
contiguous. An attention cache's backward_done() (ring_attention hooks q's gradient for it in eager runs) is called
at the end of the backward operator: the forward operator files it under a ticket, a CPU int64 scalar it returns and
autograd saves for backward. It fires with the backward's inputs still held, a little earlier than eager's hook.

Where the graph still breaks (torch.compile(fullgraph=True) refuses them; without fullgraph they run eagerly between
compiled pieces, with the same results): the other attention paths (FlexAttention's BlockMask, SDPA with a sliding
window or dropout, flash-attention kernels) read the documents on the host; checkpoint offload's saved-tensor hooks are
not traceable (a break at each decoder layer); the tiled MLP, norms and loss (memory/) call torch.autograd.grad in
their backward, which dynamo does not trace by default. tests/test_compile.py checks fullgraph at sp = 2 (Ulysses and
ring, packed rows, no recompile for a new packing) and the broken graphs at sp = 1 and 2 with the memory features.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from longseq.parallel.documents import is_single_document
from longseq.parallel.head_groups import ALL_HEADS, HeadGroups
from longseq.parallel.merge import accumulation_dtype
from longseq.parallel.ring import ring_attention, ring_attention_backward, ring_attention_forward, sendable
from longseq.parallel.ring_plan import ring_plan
from longseq.parallel.sinks import sink_gradient
from longseq.state import LongseqState

_STATES: dict[str, weakref.ref] = {}
_BACKWARD_DONE: dict[int, weakref.WeakMethod] = {}  # ticket → an attention cache's backward_done
_TICKETS = itertools.count()


def register_state(name: str, state: LongseqState) -> None:
    """Let the operators find `state` (documents, mesh, attention cache) by its attention function's name."""
    _STATES[name] = weakref.ref(state)


def state_of(name: str) -> LongseqState:
    held = _STATES.get(name, lambda: None)()
    if held is None:
        raise RuntimeError(f"longseq: attention {name!r} belongs to a model that no longer exists.")
    return held


def block_attention(q, k, v, position_ids, *, name: str, scale: float, kernel: str, window: int | None = None,
                    sinks: torch.Tensor | None = None, groups: HeadGroups = ALL_HEADS) -> torch.Tensor:
    """longseq's block kernels over the model's ring (R = 1: none) for head-split q, k, v (B, H, S, D), with a
    sliding window, (H,) sink logits and head groups (ring.ring_attention's), → out (B, S, H, D); differentiable
    w.r.t. q, k, v and the sinks. Eager runs call ring_attention itself (the same code the operators run, with no
    operator in between: tools that watch ATen ops, such as plan/live_bytes.py, see every buffer)."""
    if torch.compiler.is_compiling():
        out, _, _ = torch.ops.longseq.block_attention(q, k, v, position_ids, sinks, name, scale, kernel, window,
                                                      groups.heads, groups.memory_mib)
        return out
    state = state_of(name)
    boundaries, layouts = state.documents.lookup(position_ids)
    out = ring_attention(state.documents.mesh.ring_group, q, k, v, scale=scale, kernel=kernel, layouts=layouts,
                         boundaries=None if is_single_document(boundaries) else boundaries,
                         cache=state.attention_cache, window=window, sinks=sinks, groups=groups)
    return out.transpose(1, 2)


def _plan(state: LongseqState, q, k, v, position_ids, kernel: str, window: int | None, sinks):
    boundaries, layouts = state.documents.lookup(position_ids)
    return ring_plan(state.documents.mesh.ring_group, q, k, v, kernel=kernel, layouts=layouts, window=window,
                     sinks=sinks, boundaries=None if is_single_document(boundaries) else boundaries)


def _ticket(cache) -> torch.Tensor:
    """File the cache's backward_done (if any) for the backward operator; the ticket says where (−1: nothing)."""
    done = getattr(cache, "backward_done", None)
    if done is None:
        return torch.tensor(-1)
    for dead in [t for t, method in _BACKWARD_DONE.items() if method() is None]:  # phases whose backward never ran
        del _BACKWARD_DONE[dead]
    ticket = next(_TICKETS)
    _BACKWARD_DONE[ticket] = weakref.WeakMethod(done)
    return torch.tensor(ticket)


def _backward_done(ticket: torch.Tensor) -> None:
    method = _BACKWARD_DONE.pop(int(ticket), lambda: None)()
    if method is not None:
        method()


@torch.library.custom_op("longseq::block_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, sinks: torch.Tensor | None,
             name: str, scale: float, kernel: str, window: int | None, heads_per_call: int | None,
             memory_mib: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (B, S, H, D), lse (B, H, S) and the backward_done ticket (a CPU int64 scalar)."""
    state = state_of(name)
    plan = _plan(state, q, k, v, position_ids, kernel, window, sinks)
    group = state.documents.mesh.ring_group

    def compute():
        out, lse = ring_attention_forward(group, q, *sendable(group, k, v), scale=scale, plan=plan, kernel=kernel,
                                          sinks=sinks, groups=HeadGroups(heads_per_call, memory_mib))
        return out.transpose(1, 2).contiguous(), lse.contiguous()

    cache = state.attention_cache
    return *(compute() if cache is None else cache(compute)), _ticket(cache)


@_forward.register_fake
def _(q, k, v, position_ids, sinks, name, scale, kernel, window, heads_per_call, memory_mib):
    batch, heads, length, dim = q.shape
    lse = q.new_empty(batch, heads, length, dtype=accumulation_dtype(q.dtype))
    return q.new_empty(batch, length, heads, dim), lse, torch.empty((), dtype=torch.int64)


@torch.library.custom_op("longseq::block_attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, ticket: torch.Tensor, position_ids: torch.Tensor, sinks: torch.Tensor | None,
                 name: str, scale: float, kernel: str, window: int | None, heads_per_call: int | None,
                 memory_mib: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (B, H, S, D) and the sinks' gradient (empty without sinks); then the ticket's backward_done."""
    state = state_of(name)
    plan = _plan(state, q, k, v, position_ids, kernel, window, sinks)
    group = state.documents.mesh.ring_group
    dout, out = dout.transpose(1, 2), out.transpose(1, 2)
    grads = ring_attention_backward(group, dout, q, *sendable(group, k, v), out, lse, scale=scale, plan=plan,
                                    kernel=kernel, groups=HeadGroups(heads_per_call, memory_mib))
    dsinks = q.new_empty(0) if sinks is None else sink_gradient(dout, out, lse, sinks)
    _backward_done(ticket)
    return *(g.contiguous() for g in grads), dsinks


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, ticket, position_ids, sinks, name, scale, kernel, window, heads_per_call, memory_mib):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return *(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)), dsinks


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, position_ids, sinks, *ctx.constants = inputs
    ctx.save_for_backward(q, k, v, *output, position_ids, sinks)


def _backward(ctx, dout, _dlse, _dticket):
    q, k, v, out, lse, ticket, position_ids, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.longseq.block_attention_backward(dout, q, k, v, out, lse, ticket, position_ids,
                                                                    sinks, *ctx.constants)
    return dq, dk, dv, None, dsinks if ctx.needs_input_grad[4] else None, *(None,) * len(ctx.constants)


_forward.register_autograd(_backward, setup_context=_setup_context)
