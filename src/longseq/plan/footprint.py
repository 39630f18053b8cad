"""A choice's GPU peak and host bytes per rank: the moments of a step, summed from the memory model's terms.

Moments (Note [Where every byte goes] in memory.py): the loss and the final norm's backward, when every layer's
GPU-kept tensors are alive and no layer's gradient exists yet (Note [The loss in the plan], loss.py); and in each
layer's backward its MLP backward (and, checkpointed, its MLP's forward in the recompute), its attention backward and
what follows it (the rotary and input projections' backward), each with the tensors the layers below keep, the
layer's own saved tensors and what was prefetched for the layer below by then; and the optimizer step. Under
'full' training the fp32 gradient shards count from their layer's backward on (state.gradients_made). The GPU peak
is the largest; the host holds everything offloaded at the end of the forward, in the pages of the offloader's
arena (Note [Host arena]).
"""

from __future__ import annotations

from dataclasses import dataclass

from longseq.plan import linear, memory, placement
from longseq.plan.attention import attention_backward
from longseq.plan.choice import Choice
from longseq.plan.families import DENSE, LayerKind
from longseq.plan.loss import final_norm_backward, loss_terms
from longseq.plan.problem import Problem
from longseq.plan.state import gradients_made, training_state
from longseq.plan.terms import Peak, Term

ARENA_CHUNK = 1 << 30  # memory/host_arena.CHUNK_BYTES
ARENA_PAGE = 4096  # memory/host_arena.PAGE_BYTES


@dataclass
class Footprint:
    """One rank's memory under a choice."""

    gpu: Peak
    host: Peak
    host_budget_bytes: float
    """What the offloader holds on the host: MemoryConfig.host_memory_gib reproduces the placement."""


def arena_bytes(live: float, limit: float) -> float:
    """The host arena's size once it holds `live` bytes (Note [Host arena]): chunks of 1 GiB, smaller powers of two
    where less than that is left under its limit."""
    size = 0
    while size < live:
        room = limit - size
        chunk = ARENA_CHUNK if room >= ARENA_CHUNK else 1 << (int(room).bit_length() - 1) if room >= ARENA_PAGE else 0
        if chunk == 0:
            break
        size += chunk
    return float(size)


def _total(terms: list[Term], tokens: int) -> float:
    return sum(t.per_token * tokens + t.fixed for t in terms)


def layer_moments(problem: Problem, choice: Choice, w: memory.Widths,
                  kind: LayerKind = DENSE) -> dict[str, list[Term]]:
    """Each moment of the backward of a layer of `kind`: what the layer itself holds then."""
    through, before = memory.layer_saved(problem, choice, w, kind)
    if choice.checkpointing:
        through = through + placement.segment_inputs(choice, w)
    gradient = [Term("residual-stream gradient", "layer backward", w.hidden)]
    moments = {"MLP backward": gradient + through + before + memory.mlp_backward(problem, choice, w, kind)}
    if choice.checkpointing and kind.ffn == "dense" and memory.ffn_tiled(problem, choice, kind):
        moments["MLP forward in the recompute"] = gradient + through + before + memory.mlp_recompute(problem, choice, w)
    if kind.mixer == "linear":
        moments["linear attention backward"] = gradient + through + linear.backward(problem)
        if choice.checkpointing:
            inputs = [t for t in through if not t.name.startswith("Gated DeltaNet")]
            moments["linear attention recompute"] = gradient + inputs + linear.recompute(problem)
        return moments
    inputs = [t for t in through if t.name not in memory.ATTENTION_SAVED]
    moments.update({"attention backward": gradient + through + attention_backward(problem, choice, w, kind),
                    "after the attention backward": gradient + inputs + memory.after_attention(problem, choice, w)})
    if w.ulysses > 1 and choice.checkpointing:
        inputs_only = ("layer input", "input RMSNorm: fp32 input copy and normed output")
        layer_input = [t for t in through if t.name in inputs_only]
        moments["recompute"] = gradient + layer_input + memory.ulysses_recompute(problem, choice, w)
    return moments


def gpu_peak(problem: Problem, choice: Choice, w: memory.Widths, layout: placement.Placement) -> Peak:
    """The largest moment; sums numbers per layer and builds the term list only for the winner."""
    tokens, kinds = problem.tokens, problem.shape.kinds
    buffers = memory.global_terms(problem, w)
    fixed = training_state(problem, choice)[0] + buffers
    at_loss, at_head = (training_state(problem, choice, made)[0] + buffers for made in ("none", "root"))
    moments = {kind: layer_moments(problem, choice, w, kind) for kind in set(kinds)}
    sizes = {kind: {name: _total(terms, tokens) for name, terms in by_name.items()}
             for kind, by_name in moments.items()}
    distinct = {id(k): k for k in layout.kept}  # placement_terms gives layers placed alike one list
    totals = {key: _total(k, tokens) for key, k in distinct.items()}
    kept = [totals[id(k)] for k in layout.kept]
    loss, layers = loss_terms(problem, choice, w), problem.shape.layers
    head = final_norm_backward(problem, choice, w)
    made = {done: gradients_made(problem, choice, done) for done in (*range(layers), None)}
    best, best_size = ("optimizer step", None), _total(made[None], tokens)
    # sizes are compared over `fixed`; the loss and the final norm's backward hold fewer gradients (state.py)
    base, before_layers = _total(fixed, tokens), {"loss": at_loss + loss, "final norm backward": at_head + head}
    for name, terms in before_layers.items():
        size = sum(kept) + _total(terms, tokens) - base
        if size > best_size or (size == best_size and name == "loss"):
            best, best_size = (name, None), size
    below = 0.0
    for i in range(layers):
        grads = _total(made[layers - 1 - i], tokens)  # the layers above are done
        pre = _total(placement.prefetched(layout, i, choice, w), tokens) if choice.checkpointing else 0.0
        for name, size in sizes[kinds[i]].items():
            if below + grads + size + pre > best_size:
                best, best_size = (name, i), below + grads + size + pre
        below += kept[i]
    name, i = best
    if name == "optimizer step":
        return Peak(name, fixed + made[None], tokens)
    if i is None:
        return Peak(name, before_layers[name] + [t for k in layout.kept for t in k], tokens)
    pre = placement.prefetched(layout, i, choice, w) if choice.checkpointing else []
    below_terms = [t for k in layout.kept[:i] for t in k]
    return Peak(f"{name} of layer {i}", fixed + made[layers - 1 - i] + below_terms + pre + moments[kinds[i]][name],
                tokens)


def host_usage(problem: Problem, choice: Choice, layout: placement.Placement, limit: float) -> Peak:
    """Host bytes per rank at the end of the forward; offloaded tensors take whole pages of the arena."""
    card, tokens = problem.machine.card, problem.tokens
    terms = training_state(problem, choice)[1]
    terms.append(Term("process (interpreter, CUDA context, buffers)", "process", fixed=card.host_process_gib * 2**30))
    live = sum(-(-t.bytes(tokens) // ARENA_PAGE) * ARENA_PAGE for held in layout.host for t in held)
    if live:
        terms.append(Term("host arena: offloaded checkpoints and kept attention outputs", "offloaded (host arena)",
                          fixed=arena_bytes(live, limit)))
    return Peak("end of forward", terms, tokens)


def footprint(problem: Problem, choice: Choice) -> Footprint:
    choice = memory.effective(problem, choice)
    w = memory.widths(problem, choice)
    layout = placement.placement_terms(problem, choice, w)
    live = sum(t.bytes(problem.tokens) for held in layout.host for t in held)
    host = host_usage(problem, choice, layout, limit=budget_bytes(problem, choice, live))
    return Footprint(gpu=gpu_peak(problem, choice, w, layout), host=host, host_budget_bytes=live)


def budget_bytes(problem: Problem, choice: Choice, live: float) -> float:
    """The host budget a plan gives the offloader (MemoryConfig.host_memory_gib): its planned bytes with half a kept
    output's worth of room (so its budget rule keeps exactly the planned outputs), or 1/16 GiB without the cache."""
    shape, tokens = problem.shape, problem.tokens
    pair = tokens * (shape.attention_width * problem.dtype_bytes + shape.heads * 4)
    return live + (pair / 2 if choice.checkpointing and choice.cache_attention else 2**30 / 16)
