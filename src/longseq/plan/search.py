"""The search: the fastest choice that fits a problem, the longest length that fits, and what is short otherwise.

Note [Plan search]
~~~~~~~~~~~~~~~~~~
Bases are enumerated: the tiled features (MLP; norms, fused into their readers or not; loss), the tile size, the
attention call's memory target, FSDP2's CPU offload, checkpointing, the attention cache and layers_per_checkpoint.
For a base, a count of layers keeping their checkpoint on the GPU is tried at a time (every count for shallow
models, sixteen steps otherwise), and kept attention outputs are placed greedily: on the host for the first layers
as far as the host has room, then on the GPU for the last layers as far as it has room. Every candidate is evaluated
(once per search: Evaluations) by the memory model (footprint.py) and the time model (timing.py); the fastest that
fits GPU and host wins. Bases are visited by a bound on their time (every checkpoint and output on the GPU: nothing
recomputed, nothing copied, which no placement beats), and the visit stops at the first bound no faster than the
best found, or over the step-time budget if one is given.

Memory grows with length for every candidate, so "some candidate fits" is monotone in length and in the budgets,
and the longest length is found by doubling and bisection over the least-memory candidates: all features tiled and
fused, the smallest tile and attention target, no kept outputs, for each cache setting, layers_per_checkpoint and
FSDP2 offload, with the fewest checkpoints on the GPU that the host allows (or all, or none): nothing else uses less
of either budget, so more memory never gives a shorter length. With a step-time budget the fastest fitting
candidate's time decides instead.

A plan fits the GPU when its predicted peak is at most gpu_memory × (1 − Machine.gpu_headroom), a margin of 5% of
the card (7.0 GiB on an H200) for what max_memory_allocated does not see or the model leaves out: CUDA's context
and libraries (0.8 GiB beside PyTorch's allocations in device call 26), blocks reserved but not allocated (0.3 GiB
there), and the model's own error. Device call 26 (8B shape, 8 layers, 'full', one H200) measured the choices it
ran at 16K and 64K 3.7% and 1.2% below the corrected model's predictions, and at 32K 2.9% below the prediction
plus the outputs the code then leaked (docs/plan.md); the CPU checks (tests/test_plan_measured.py) hold each
moment within 0.3%. So 5% stays, and a plan never predicts more than the card less it (tests/test_plan_search.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from longseq.plan.choice import Choice
from longseq.plan.footprint import Footprint, footprint
from longseq.plan.memory import effective
from longseq.plan.problem import Problem
from longseq.plan.timing import StepTime, step_time

TILES = (4096, 1024, 256, 64)  # tile_memory_mib: larger tiles, fewer weight-gradient passes (Note [Step time])
ATTENTION_MIB = (1024, 256)
DENSITIES = (1, 2, 4)
NORMS = ((True, True), (True, False), (False, False))  # (tiled_norms, fuse_norms)
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
    """`choice` as it runs (a tiled MLP of one tile is the untiled MLP: memory.effective), under the model."""
    choice = effective(problem, choice)
    usage = footprint(problem, choice)
    host_per_host = usage.host.bytes * problem.ranks_per_host
    return Evaluation(choice=choice, footprint=usage, time=step_time(problem, choice),
                      gpu_over=usage.gpu.bytes - problem.machine.gpu_limit,
                      host_over=host_per_host - problem.machine.host_limit)


class Evaluations:
    """evaluate() for one problem, each choice once: the search reaches many choices by several paths (a scanned
    count of GPU-kept checkpoints that is also a least-memory placement, the ends of the bisections)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self._done: dict[Choice, Evaluation] = {}

    def __call__(self, choice: Choice) -> Evaluation:
        if choice not in self._done:
            self._done[choice] = evaluate(self.problem, choice)
        return self._done[choice]


def _bases(problem: Problem, least_memory: bool):
    """Choices before placement (Note [Plan search])."""
    fixed = problem.workload.fsdp_cpu_offload
    fsdp = ((False, True) if fixed is None else (fixed,)) if problem.workload.training == "full" else (False,)
    packed_alone = problem.workload.longest_document is not None and problem.layout.sp == 1
    caches = (True,) if packed_alone else (True, False)  # the model's own SDPA with packed documents is not modelled
    if least_memory:
        for offload, cache, k in itertools.product(fsdp, caches, DENSITIES):
            yield Choice(tile_memory_mib=TILES[-1], attention_memory_mib=ATTENTION_MIB[-1], fsdp_cpu_offload=offload,
                         cache_attention=cache, layers_per_checkpoint=k)
        return
    for mlp, (norms, fuse), loss, offload in itertools.product((True, False), NORMS, (True, False), fsdp):
        for tile in TILES if mlp or norms or loss else TILES[:1]:
            base = Choice(tiled_mlp=mlp, tiled_norms=norms, fuse_norms=fuse, tiled_loss=loss, tile_memory_mib=tile,
                          fsdp_cpu_offload=offload)
            if not packed_alone:
                yield replace(base, checkpointing=False, cache_attention=False)
            for cache, k, target in itertools.product(caches, DENSITIES, ATTENTION_MIB):
                yield replace(base, cache_attention=cache, layers_per_checkpoint=k, attention_memory_mib=target)


def _time_bound(problem: Problem, base: Choice) -> float:
    """No placement of `base` is faster than every checkpoint and kept output on the GPU."""
    layers = problem.shape.layers
    everything_on_gpu = replace(base, checkpoint_gpu_layers=layers, attention_gpu_layers=layers)
    return step_time(problem, everything_on_gpu if base.checkpointing else base).seconds


def _gpu_counts(layers: int) -> list[int]:
    """Counts of GPU-kept checkpoints tried: all up to 16 layers, sixteen steps beyond."""
    return list(range(layers + 1)) if layers <= 16 else sorted({round(layers * i / 16) for i in range(17)})


def _with_kept_outputs(evaluations: Evaluations, choice: Choice) -> Evaluation:
    """`choice` with as many attention outputs kept as host, then GPU, room allows (Note [Plan search])."""
    layers = evaluations.problem.shape.layers
    plain = evaluations(replace(choice, attention_gpu_layers=0, attention_host_layers=0))
    if not choice.cache_attention or not plain.fits:
        return plain
    best = _largest_fitting(evaluations, plain, "attention_host_layers", layers)
    return _largest_fitting(evaluations, best, "attention_gpu_layers", layers)


def _largest_fitting(evaluations: Evaluations, fitting: Evaluation, field: str, high: int) -> Evaluation:
    """The largest value up to `high` of a count field that fits (memory grows with it), by bisection from the
    fitting evaluation's value."""
    best, low = fitting, getattr(fitting.choice, field)
    while low < high:
        middle = (low + high + 1) // 2
        candidate = evaluations(replace(fitting.choice, **{field: middle}))
        if candidate.fits:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best


def _host_fitting(evaluations: Evaluations, choice: Choice) -> list[Evaluation]:
    """Least-memory placements of `choice`: all checkpoints offloaded (least GPU), all on the GPU (least host), and
    the fewest on the GPU that the host allows (host bytes fall and GPU bytes grow with that count)."""
    layers = evaluations.problem.shape.layers
    at = (lambda n: evaluations(replace(choice, checkpoint_gpu_layers=n, attention_gpu_layers=0)))
    ends = [at(0), at(layers)]
    if ends[0].host_over <= 0 or ends[1].host_over > 0:
        return ends
    low, high = 0, layers  # the host does not fit at low, fits at high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if at(middle).host_over > 0 else (low, middle)
    return ends + [at(high)]


def least_memory_candidates(problem: Problem):
    evaluations = Evaluations(problem)
    for base in _bases(problem, least_memory=True):
        yield from _host_fitting(evaluations, base)


def fastest(problem: Problem, max_step_s: float | None = None) -> Evaluation | None:
    """The fastest fitting candidate (within max_step_s), or None (Note [Plan search])."""
    best, evaluations = None, Evaluations(problem)
    for bound, base in sorted(((_time_bound(problem, b), b) for b in _bases(problem, least_memory=False)),
                              key=lambda pair: pair[0]):
        if (best is not None and bound >= best.time.seconds) or (max_step_s is not None and bound > max_step_s):
            break  # no placement of this base or a later one is faster than its bound
        for e in _placements(evaluations, base):
            if e.fits and (max_step_s is None or e.time.seconds <= max_step_s):
                if best is None or e.time.seconds < best.time.seconds:
                    best = e
    return best


def _placements(evaluations: Evaluations, base: Choice):
    """The evaluated placements of a base: the scanned counts of GPU-kept checkpoints with outputs kept greedily,
    and the least-memory ones (so that whatever fits_somehow finds, the search finds too)."""
    if not base.checkpointing:
        yield evaluations(base)
        return
    for on_gpu in _gpu_counts(evaluations.problem.shape.layers):
        yield _with_kept_outputs(evaluations, replace(base, checkpoint_gpu_layers=on_gpu))
    for least in _host_fitting(evaluations, base):
        yield _with_kept_outputs(evaluations, least.choice)


def fits_somehow(problem: Problem) -> bool:
    return any(e.fits for e in least_memory_candidates(problem))


def longest_length(problem: Problem, max_step_s: float | None = None) -> int:
    """The longest length (a multiple of LENGTH_STEP) at which some candidate fits (Note [Plan search]); 0: none."""
    def ok(length: int) -> bool:
        trial = problem.with_length(length)
        if not fits_somehow(trial):
            return False
        return max_step_s is None or fastest(trial, max_step_s) is not None

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


def shortfall(problem: Problem) -> Shortfall:
    """The least-memory candidates' best on each budget at a length where none fits both (Note [Plan search])."""
    evaluations = list(least_memory_candidates(problem))
    return Shortfall(gpu_over=min(e.gpu_over for e in evaluations), host_over=min(e.host_over for e in evaluations),
                     closest=min(evaluations, key=lambda e: e.overshoot(problem)))
