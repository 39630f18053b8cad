"""A choice's GPU peak and host bytes per rank: the moments of a step, summed from the memory model's terms.

Moments (Note [Where every byte goes] in memory.py): the loss, when every layer's GPU-kept tensors are alive; and
each layer's MLP and attention backward, with the tensors kept by the layers below it, its own saved tensors and
what was prefetched for the layer below. The GPU peak is the largest; the host holds everything offloaded at the
end of the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from longseq.plan import memory
from longseq.plan.choice import Choice
from longseq.plan.problem import Problem
from longseq.plan.state import training_state
from longseq.plan.terms import Peak, Term


@dataclass
class Footprint:
    """One rank's memory under a choice."""

    gpu: Peak
    host: Peak
    host_budget_bytes: float
    """What the offloader holds on the host, unrounded: MemoryConfig.host_memory_gib reproduces the placement."""


def _pinned(nbytes: float, pinned: bool) -> float:
    """CUDA's caching host allocator rounds each pinned block up to a power of two."""
    return float(1 << max(0, int(nbytes) - 1).bit_length()) if pinned and nbytes > 0 else nbytes


def _total(terms: list[Term], tokens: int) -> float:
    return sum(t.per_token * tokens + t.fixed for t in terms)


def gpu_peak(problem: Problem, choice: Choice, w: memory.Widths, layout: memory.Placement) -> Peak:
    """The largest moment; sums numbers per layer and builds the term list only for the winner."""
    tokens = problem.tokens
    fixed = training_state(problem, choice)[0] + memory.global_terms(problem, w)
    through, before = memory.layer_saved(problem, choice, w)
    if choice.checkpointing:
        through = through + memory.segment_inputs(choice, w)
    gradient = [Term("residual-stream gradient", "layer backward", w.hidden)]
    moments = {"attention backward": gradient + through + memory.attention_backward(problem, w),
               "MLP backward": gradient + through + before + memory.mlp_backward(problem, choice, w)}
    sizes = {name: _total(terms, tokens) for name, terms in moments.items()}
    totals: dict[int, float] = {}
    kept = [totals.setdefault(id(k), _total(k, tokens)) for k in layout.kept]
    cache = choice.checkpointing and choice.cache_attention
    loss = memory.loss_terms(problem, choice, w)
    best, best_size, below = ("loss", None), sum(kept) + _total(loss, tokens), 0.0
    largest = max(sizes.values())
    prefetch: dict[tuple, float] = {}
    offloaded_below = False
    for i in range(problem.shape.layers):
        key = (offloaded_below, i > 0 and layout.host_pair[i - 1])
        offloaded_below = offloaded_below or layout.offloaded[i]
        if key not in prefetch:
            pre = memory.prefetched(layout, i, cache, w) if choice.checkpointing else []
            prefetch[key] = _total(pre, tokens)
        size = below + prefetch[key] + largest
        if size > best_size:
            best, best_size = (max(sizes, key=sizes.get), i), size
        below += kept[i]
    name, i = best
    if name == "loss":
        return Peak("loss", fixed + [t for k in layout.kept for t in k] + loss, tokens)
    pre = memory.prefetched(layout, i, cache, w) if choice.checkpointing else []
    return Peak(f"{name} of layer {i}", fixed + [t for k in layout.kept[:i] for t in k] + pre + moments[name], tokens)


def host_usage(problem: Problem, choice: Choice, layout: memory.Placement) -> tuple[Peak, float]:
    """(host bytes per rank at the end of the forward, the offloader's unrounded share of them)."""
    card, tokens = problem.machine.card, problem.tokens
    terms = training_state(problem, choice)[1]
    terms.append(Term("process (interpreter, CUDA context, buffers)", "process", fixed=card.host_process_gib * 2**30))
    offloaded, rounded = 0.0, {}
    for held in layout.host:
        for term in held:
            nbytes = term.bytes(tokens)
            offloaded += nbytes
            key = (term.name, term.group)
            rounded[key] = rounded.get(key, 0.0) + _pinned(nbytes, card.pinned_host_memory)
    terms += [Term(name, group, fixed=nbytes) for (name, group), nbytes in rounded.items()]
    return Peak("end of forward", terms, tokens), offloaded


def footprint(problem: Problem, choice: Choice) -> Footprint:
    choice = memory.effective(problem, choice)
    w = memory.widths(problem, choice)
    layout = memory.placement_terms(problem, choice, w)
    host, offloaded = host_usage(problem, choice, layout)
    return Footprint(gpu=gpu_peak(problem, choice, w, layout), host=host, host_budget_bytes=offloaded)
