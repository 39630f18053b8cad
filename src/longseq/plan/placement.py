"""Where each layer's checkpoint and kept attention output live (GPU, host, nowhere) and what backward brings
back ahead of its use. Part of Note [Where every byte goes] (memory.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from longseq.plan.attention import keeps_output
from longseq.plan.choice import Choice
from longseq.plan.memory import Widths, layer_saved
from longseq.plan.problem import Problem
from longseq.plan.terms import Term


@dataclass
class Placement:
    """Per layer: what it keeps on the GPU from its forward to its backward, and what it holds on the host."""

    kept: list[list[Term]] = field(default_factory=list)
    host: list[list[Term]] = field(default_factory=list)
    offloaded: list[bool] = field(default_factory=list)
    """Its checkpoint is on the host."""
    host_pair: list[bool] = field(default_factory=list)
    """Its kept attention output is on the host."""
    through_cache: list[bool] = field(default_factory=list)
    """Its attention runs through the attention cache (whether or not it keeps its output there)."""


def _on_host(per_token: float, problem: Problem) -> bool:
    """The offloader moves only tensors of at least offload_min_bytes."""
    return per_token * problem.tokens >= problem.offload_min_bytes


def placement_terms(problem: Problem, choice: Choice, w: Widths) -> Placement:
    """Each layer's GPU-kept and host-held terms under the choice's placement. Linear-attention layers keep no
    attention output (they have none), nor do sliding-window layers run as SDPA chunks (no log-sum-exp)."""
    result = Placement()
    pair = [("kept attention output", w.q), ("kept attention log-sum-exp", w.lse)]
    built: dict[tuple, tuple[list[Term], list[Term], bool]] = {}
    for row, kind in zip(choice.placement(problem.shape.layers), problem.shape.kinds):
        checkpoint, attention = row
        keeps_pair = attention in ("gpu", "host") and keeps_output(problem, kind)
        if (row, kind) not in built:
            kept, host = [], []
            offloaded = checkpoint == "host" and _on_host(w.hidden, problem)
            if not choice.checkpointing:
                through, before = layer_saved(problem, choice, w, kind)
                kept = [Term(t.name, "activations kept (no checkpointing)", t.per_token) for t in through + before]
            elif offloaded:
                host.append(Term("checkpoint", "offloaded checkpoints", w.hidden))
            elif checkpoint != "none":
                kept.append(Term("checkpoint", "checkpoints on the GPU", w.hidden))
            for name, width in pair if keeps_pair else []:
                if attention == "host" and _on_host(width, problem):
                    host.append(Term(name, "kept attention outputs on the host", width))
                else:
                    kept.append(Term(name, "kept attention outputs on the GPU", width))
            built[row, kind] = kept, host, offloaded
        kept, host, offloaded = built[row, kind]
        result.kept.append(kept)
        result.host.append(host)
        result.offloaded.append(offloaded)
        result.host_pair.append(keeps_pair and attention == "host")
        result.through_cache.append(choice.checkpointing and choice.cache_attention and keeps_output(problem, kind))
    return result


def prefetched(layout: Placement, i: int, choice: Choice, w: Widths) -> list[Term]:
    """Copies already brought back for the layers below while layer i's backward runs, the same at each of its
    moments ('MLP backward', 'attention backward', 'after the attention backward'; Note [Checkpoint offload]). With
    prefetch_after_attention and the cache, the previous checkpoint starts coming back once the attention backward
    of the checkpoint's first layer is done, if that layer's attention ran through the cache (kept or not), and was
    not seen alive beside the rotary backward's peak (plan/live_bytes.py): none at these moments. Otherwise (a Gated
    DeltaNet layer, a window run as SDPA chunks) it comes back when i's checkpoint is unpacked, with layer i−1's
    kept output beside it."""
    g, k = "prefetched for the next layer", choice.layers_per_checkpoint
    previous = (i // k - 1) * k  # the first layer of the checkpoint before layer i's
    checkpoint = [Term("next checkpoint", g, w.hidden)] if previous >= 0 and layout.offloaded[previous] else []
    cache = choice.checkpointing and choice.cache_attention
    if cache and choice.prefetch_after_attention and layout.through_cache[i // k * k]:
        return []  # after the attention backward: not seen beside its peak
    pair = [Term(t.name.replace("kept", "next kept"), g, t.per_token) for t in layout.host[i - 1]
            if "attention" in t.name] if cache and i > 0 and layout.host_pair[i - 1] else []
    return checkpoint + pair


def segment_inputs(choice: Choice, w: Widths) -> list[Term]:
    k = choice.layers_per_checkpoint
    return [Term("inputs of the segment's other layers", "layer saved tensors", (k - 1) * w.hidden)] if k > 1 else []
