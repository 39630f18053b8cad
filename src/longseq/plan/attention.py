"""The attention backward's buffers per token of a rank: longseq's block kernels in head groups (one GPU with the
cache, Ulysses, ring), and the model's own SDPA (one GPU without the cache). Part of Note [Where every byte goes]
(memory.py); each term names the tensor it counts."""

from __future__ import annotations

from longseq.parallel.window import band_rows
from longseq.plan.choice import Choice
from longseq.plan.families import DENSE, LayerKind
from longseq.plan.problem import Problem
from longseq.plan.terms import Term

_G = "attention backward"


def head_share(problem: Problem, choice: Choice, length: int) -> float:
    """The share of a rank's query heads that one kernel call over `length` positions takes, by the code's own rule
    (Note [Attention head groups], parallel/head_groups.py) applied to shape-only tensors."""
    import torch

    from longseq.parallel.head_groups import HeadGroups

    shape, ulysses = problem.shape, problem.layout.ulysses
    heads, kv_heads = shape.heads // ulysses, max(shape.kv_heads, ulysses) // ulysses
    dtype = torch.bfloat16 if problem.dtype_bytes == 2 else torch.float32
    q = torch.empty(problem.workload.batch, heads, length, shape.head_dim, dtype=dtype, device="meta")
    k = torch.empty(problem.workload.batch, kv_heads, length, shape.head_dim, dtype=dtype, device="meta")
    return HeadGroups(memory_mib=choice.attention_memory_mib).size(q, k) / heads


def kernel_call(w, heads: float, q_share: float, k_share: float) -> list[Term]:
    """One block_backward (parallel/kernels.py) over shares of the rank's query and key positions, its kernel calls
    taking `heads` of the rank's heads each. The kernels read q, k, v, out and dout strided; the log-sum-exp is
    made dense; K/V are expanded to a call's query heads; a call returns dq, dk, dv of its heads and has its own
    workspace, after which dk, dv are summed back to the K/V heads (in fp32 on a ring, whose dq is cast too)."""
    acc = w.fp32 if w.ring > 1 else 1.0  # the gradients' dtype over the compute dtype
    kv_grad = w.q if w.expand else w.kv
    terms = []
    if heads < 1:
        whole = acc * (w.q * q_share + 2 * w.kv * k_share)
        terms.append(Term("dq, dk, dv of all heads, filled call by call", _G, whole))
    if not w.lse_dense or q_share < 1:
        terms.append(Term("log-sum-exp made dense", _G, w.lse * q_share * heads))
    copies = 2 * kv_grad * k_share * heads if w.expand or heads < 1 else 0.0
    if copies:
        terms.append(Term("K and V of the call's heads (expanded to its query heads)", _G, copies))
    terms.append(Term("kernel dq, dk, dv", _G, (w.q * q_share + 2 * kv_grad * k_share) * heads))
    # After the kernel its K/V copies are gone and dk, dv are summed back to the K/V heads (in fp32 on a ring,
    # whose dq is cast too): more than the workspace only where the copies were smaller than the sums.
    folded = (w.expand or acc > 1) * 2 * w.kv * k_share * heads * acc
    after = folded + (acc * w.q * q_share if acc > 1 and heads == 1 else 0.0) - copies
    if w.workspace * q_share * heads >= after:
        return terms + [Term("kernel workspace", _G, w.workspace * q_share * heads)]
    return terms + [Term("dk, dv summed to the K/V heads (and dq cast), less the K/V copies", _G, after)]


def windowed(problem: Problem, kind: LayerKind) -> str | None:
    """How a sliding-window layer runs where its window is shorter than the sequence: 'band' on longseq's block
    kernels (with sinks, or on a ring: Note [Sliding windows on blocks]), 'chunks' as SDPA calls of a window's
    queries each (parallel/local.py; no log-sum-exp, so no output is kept); None: no window cuts it."""
    window = problem.shape.sliding_window
    if kind.mixer != "sliding" or window is None or window >= problem.workload.length:
        return None
    return "band" if problem.shape.sinks or problem.layout.ring > 1 else "chunks"


def keeps_output(problem: Problem, kind: LayerKind) -> bool:
    """Whether the layer's attention can keep its output for backward (Note [Attention output cache])."""
    return kind.mixer != "linear" and windowed(problem, kind) != "chunks"


def attention_backward(problem: Problem, choice: Choice, w, kind: LayerKind = DENSE) -> list[Term]:
    """Buffers of the attention backward at its largest, on top of the layer's saved tensors."""
    dout = [Term("attention output gradient", _G, w.q)]
    cut = windowed(problem, kind)
    if cut == "band" and w.ring == 1:
        return dout + _band_terms(problem, w)
    if w.path == "sdpa" or cut == "chunks":
        kv_grad = w.q if w.expand and problem.machine.card.sdpa_gqa_expands_kv_grads else 0.0
        return dout + [Term("kernel dq, dk, dv", _G, w.q + 2 * w.kv),
                       Term("kernel dk, dv per query head", _G, 2 * kv_grad),
                       Term("kernel workspace", _G, w.workspace)]
    work = problem.workload
    if w.ring > 1:
        return dout + _ring_terms(w) + _largest_ring_call(problem, choice, w)
    share = work.document / work.length
    heads = head_share(problem, choice, work.document)
    terms = dout + kernel_call(w, heads, share, share)
    if share < 1:
        terms.append(Term("dq, dk, dv of the whole sequence (per-document calls)", _G, w.q + 2 * w.kv))
    return terms


def _band_terms(problem: Problem, w) -> list[Term]:
    """A band's backward over every head of the rank (window.band_backward): fp32 dq, dk, dv and the rows' delta,
    and one chunk of rows at a time: its scores' probabilities, the gradient against v less delta, and ds (three
    (rows × keys) fp32 tensors per head); after the last chunk the gradients cast to the compute dtype instead."""
    shape, batch = problem.shape, problem.workload.batch
    heads, window, length = shape.heads // w.ulysses, shape.sliding_window, problem.workload.document
    rows = band_rows(batch, heads, length, length, window)
    chunk = 3 * batch * heads * rows * min(length, rows + window - 1) * 4
    cast = (w.q + 2 * w.kv) if w.fp32 > 1 else 0.0
    terms = [Term("band dq, dk, dv (fp32) and delta", _G, w.fp32 * (w.q + 2 * w.kv) + w.lse)]
    if cast * problem.tokens > chunk:
        return terms + [Term("band gradients cast to the compute dtype", _G, cast)]
    return terms + [Term("band: one chunk's probabilities and their gradients (fp32)", _G, fixed=chunk)]


def _ring_terms(w) -> list[Term]:
    """What a ring's backward holds besides its current call (Note [Ring attention]): fp32 dq, this step's dk/dv
    and the ones travelling (sent, received), the K/V received (and, beyond two ranks, the ones held), and the
    previous call's gradients, still referenced (at two ranks that call was one chunk against one)."""
    previous = 0.5 * (w.q + 2 * w.kv) if w.ring == 2 else max(w.q + w.kv, 0.5 * w.q + 2 * w.kv)
    return [Term("ring dq accumulator (fp32)", _G, w.fp32 * w.q),
            Term("ring dk/dv: this step's, sent and received (fp32)", _G, 3 * 2 * w.fp32 * w.kv),
            Term("ring K/V received", _G, (1 if w.ring == 2 else 2) * 2 * w.kv),
            Term("the previous call's gradients (fp32)", _G, w.fp32 * previous)]


def _largest_ring_call(problem: Problem, choice: Choice, w) -> list[Term]:
    """Zigzag's largest calls: a rank's two q chunks against one k chunk, or one q chunk against both."""
    heads = head_share(problem, choice, problem.workload.length // problem.layout.ring)
    calls = [kernel_call(w, heads, 1.0, 0.5), kernel_call(w, heads, 0.5, 1.0)]
    return max(calls, key=lambda c: sum(t.per_token for t in c))
