"""The search: the fastest choice that fits a problem, the longest length that fits, and what is short otherwise.

Note [Plan search]
~~~~~~~~~~~~~~~~~~
Features (tiled MLP, norms, loss), the tile size, FSDP2's CPU offload, checkpointing, the attention cache and
layers_per_checkpoint are enumerated; for each, every count of layers keeping their checkpoint on the GPU
(0 … L) is tried, and kept attention outputs are then placed greedily: on the host for the first offloaded layers
as far as the host has room, then (where MemoryConfig can) on the GPU as far as it has room. Every candidate is
evaluated by the memory model (footprint.py) and the time model (timing.py); the fastest that fits GPU and host
wins. Memory grows with length for every candidate, so "some candidate fits" is monotone in length and in the
budgets, and the longest length is found by doubling and bisection over the least-memory candidates (all tiled,
smallest tile, no kept outputs: nothing else uses less of either budget) — more memory never gives a shorter
length. With a step-time budget the fastest fitting candidate's time decides instead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from longseq.plan.choice import Choice, available_knobs
from longseq.plan.footprint import Footprint, footprint
from longseq.plan.problem import Problem
from longseq.plan.timing import StepTime, step_time

TILES = (256, 64)
LENGTH_STEP = 1024  # maximum lengths are reported in multiples of this
MAX_LENGTH = 1 << 30


@dataclass
class Evaluation:
    """A choice under the model: its memory, its time, and how far over each budget it is (≤ 0: fits)."""

    choice: Choice
    footprint: Footprint
    time: StepTime
    gpu_over: float
    host_over: float

    @property
    def fits(self) -> bool:
        return self.gpu_over <= 0 and self.host_over <= 0

    def overshoot(self, problem: Problem) -> float:
        """The larger relative excess over the two budgets (what the closest candidate minimises)."""
        machine = problem.machine
        return max(self.gpu_over / machine.gpu_limit, self.host_over / machine.host_limit)


def evaluate(problem: Problem, choice: Choice) -> Evaluation:
    usage = footprint(problem, choice)
    host_per_host = usage.host.bytes * problem.ranks_per_host
    return Evaluation(choice=choice, footprint=usage, time=step_time(problem, choice),
                      gpu_over=usage.gpu.bytes - problem.machine.gpu_limit,
                      host_over=host_per_host - problem.machine.host_limit)


def _base_choices(problem: Problem, knobs: frozenset[str], least_memory: bool):
    """Choices before placement: features, tile, FSDP2 offload, checkpointing, cache, layers_per_checkpoint."""
    features = [(True, True, True)] if least_memory else list(itertools.product((True, False), repeat=3))
    fsdp = (False, True) if problem.workload.training == "full" else (False,)
    packed_alone = problem.workload.longest_document is not None and problem.layout.sp == 1
    caches = (True,) if packed_alone else (True, False)  # the model's own SDPA with packed documents is not modelled
    densities = (1, 2, 4) if "layers_per_checkpoint" in knobs else (1,)
    for (mlp, norms, loss), offload in itertools.product(features, fsdp):
        tiles = TILES[-1:] if least_memory else (TILES if mlp or loss else TILES[:1])
        for tile in tiles:
            base = Choice(tiled_mlp=mlp, tiled_norms=norms, tiled_loss=loss, tile_memory_mib=tile,
                          fsdp_cpu_offload=offload)
            if not least_memory and not packed_alone:
                yield replace(base, checkpointing=False, cache_attention=False)
            for cache, k in itertools.product(caches, densities):
                yield replace(base, cache_attention=cache, layers_per_checkpoint=k)


def _with_kept_outputs(problem: Problem, choice: Choice, knobs: frozenset[str]) -> Evaluation:
    """`choice` with as many attention outputs kept as host (then GPU) room allows (Note [Plan search])."""
    offloaded = problem.shape.layers - choice.checkpoint_gpu_layers
    plain = evaluate(problem, choice)
    if not choice.cache_attention or offloaded == 0 or not plain.fits:
        return plain
    one = evaluate(problem, replace(choice, attention_host_layers=1))
    per_pair = (one.host_over - plain.host_over) or 1.0
    host_pairs = min(offloaded, max(0, int(-plain.host_over // per_pair)))
    best = _largest_fitting(problem, choice, "attention_host_layers", host_pairs)
    if "attention_gpu_layers" in knobs and best.choice.attention_host_layers < offloaded:
        room = offloaded - best.choice.attention_host_layers
        best = _largest_fitting(problem, best.choice, "attention_gpu_layers", room)
    return best


def _largest_fitting(problem: Problem, choice: Choice, field: str, upper: int) -> Evaluation:
    """The largest value ≤ upper of a count field that fits (memory is monotone in it), by bisection."""
    low, high = 0, upper
    best = evaluate(problem, replace(choice, **{field: 0}))
    while low < high:
        middle = (low + high + 1) // 2
        candidate = evaluate(problem, replace(choice, **{field: middle}))
        if candidate.fits:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best


def _host_fitting(problem: Problem, choice: Choice) -> list[Evaluation]:
    """Least-memory placements of `choice`: all checkpoints offloaded (least GPU), all on the GPU (least host), and
    the fewest on the GPU that the host allows (host bytes fall and GPU bytes grow with that count)."""
    layers = problem.shape.layers
    ends = [evaluate(problem, replace(choice, checkpoint_gpu_layers=n)) for n in (0, layers)]
    if ends[0].host_over <= 0 or ends[1].host_over > 0:
        return ends
    low, high = 0, layers  # host does not fit at low, fits at high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if evaluate(problem, replace(choice, checkpoint_gpu_layers=middle)).host_over > 0 \
            else (low, middle)
    return ends + [evaluate(problem, replace(choice, checkpoint_gpu_layers=high))]


def candidates(problem: Problem, knobs: frozenset[str] | None = None, least_memory: bool = False):
    """Every evaluated candidate of the search space (placements of kept outputs solved greedily); with
    least_memory, only the candidates that use the least of the GPU, of the host, or of both."""
    knobs = available_knobs() if knobs is None else knobs
    for base in _base_choices(problem, knobs, least_memory):
        if not base.checkpointing:
            yield evaluate(problem, base)
        elif least_memory:
            yield from _host_fitting(problem, base)
        else:
            for on_gpu in range(problem.shape.layers + 1):
                yield _with_kept_outputs(problem, replace(base, checkpoint_gpu_layers=on_gpu), knobs)


def fastest(problem: Problem, knobs: frozenset[str] | None = None, max_step_s: float | None = None):
    """(the fastest fitting evaluation or None, the closest evaluation when none fits)."""
    best = closest = None
    for e in candidates(problem, knobs):
        if e.fits and (max_step_s is None or e.time.seconds <= max_step_s):
            if best is None or e.time.seconds < best.time.seconds:
                best = e
        if closest is None or e.overshoot(problem) < closest.overshoot(problem):
            closest = e
    return best, closest


def fits_somehow(problem: Problem, knobs: frozenset[str] | None = None) -> bool:
    return any(e.fits for e in candidates(problem, knobs, least_memory=True))


def longest_length(problem: Problem, max_step_s: float | None = None,
                   knobs: frozenset[str] | None = None) -> int:
    """The longest length (a multiple of LENGTH_STEP) at which some candidate fits (Note [Plan search]); 0: none."""
    def ok(length: int) -> bool:
        trial = problem.with_length(length)
        if not fits_somehow(trial, knobs):
            return False
        return max_step_s is None or fastest(trial, knobs, max_step_s)[0] is not None

    low, high = 0, LENGTH_STEP
    while high <= MAX_LENGTH and ok(high):
        low, high = high, high * 2
    while high - low > LENGTH_STEP:
        middle = (low + high) // 2 // LENGTH_STEP * LENGTH_STEP
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


@dataclass
class Shortfall:
    """Why a length does not fit: the least any candidate is over each budget (bytes; ≤ 0: that budget alone can
    be met), and the candidate nearest to fitting both."""

    gpu_over: float
    host_over: float
    closest: Evaluation

    @property
    def limit(self) -> str:
        over = [name for name, excess in (("GPU memory", self.gpu_over), ("host memory", self.host_over))
                if excess > 0]
        return " and ".join(over) or "GPU and host memory together"


def shortfall(problem: Problem, knobs: frozenset[str] | None = None) -> Shortfall:
    """The least-memory candidates' best on each budget at a length where none fits both (Note [Plan search])."""
    evaluations = list(candidates(problem, knobs, least_memory=True))
    return Shortfall(gpu_over=min(e.gpu_over for e in evaluations), host_over=min(e.host_over for e in evaluations),
                     closest=min(evaluations, key=lambda e: e.overshoot(problem)))
