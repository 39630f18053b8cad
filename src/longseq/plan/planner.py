"""The planner's entry points: a plan for a length, the longest length, and `plan_for` (a MemoryConfig for a model,
mesh, batch and machine: what `longseq.apply(model, mesh, "auto")` will call)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from longseq.plan import search
from longseq.plan.card import Card, load_card
from longseq.plan.choice import memory_config_kwargs, to_memory_config
from longseq.plan.footprint import budget_bytes
from longseq.plan.errors import PlanError
from longseq.plan.problem import Layout, Machine, Problem, Workload
from longseq.plan.shapes import ModelShape, shape_from_config

_GIB = 2**30


@dataclass
class Plan:
    """The answer for one problem: the chosen evaluation, or what is short."""

    problem: Problem
    chosen: search.Evaluation | None
    """The fastest candidate that fits; None when none does."""
    short: search.Shortfall | None = None
    """When none fits: how far each budget is short."""
    longest: int | None = None
    """For length=max: the longest length that fits (the problem is planned at it)."""
    limit: str | None = None
    """What stops a longer length (length=max), or what is short (nothing fits)."""
    max_step_s: float | None = None

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    @property
    def shown(self) -> search.Evaluation:
        """The evaluation to show: the chosen one, or the closest to fitting."""
        return self.chosen or self.short.closest

    def host_budget_bytes(self) -> float:
        """The offloader's host budget (footprint.budget_bytes)."""
        return budget_bytes(self.problem, self.chosen.choice, self.chosen.footprint.host_budget_bytes)

    def memory_config(self):
        """The MemoryConfig that runs the chosen configuration (PlanError when nothing fits)."""
        if not self.fits:
            raise PlanError(self.shortfall_message())
        return to_memory_config(self.chosen.choice, self.host_budget_bytes(), self.problem.offload_min_bytes)

    def shortfall(self) -> dict[str, float]:
        """GiB each budget is short by at least (whatever the placement), 0 where it alone can be met."""
        return {"gpu_gib": max(0.0, self.short.gpu_over / _GIB), "host_gib": max(0.0, self.short.host_over / _GIB)}

    def shortfall_message(self) -> str:
        short, work = self.shortfall(), self.problem.workload
        parts = [f"{name} memory is short by at least {short[key]:.1f} GiB" for name, key in
                 (("GPU", "gpu_gib"), ("host", "host_gib")) if short[key] > 0]
        if self.limit == "step time":
            parts = [f"every fitting configuration takes longer than --max-step-s {self.max_step_s:g} s"]
        elif not parts:
            closest = self.short.closest
            parts = [f"GPU and host memory can each be met, but not together (the closest configuration is "
                     f"{max(0.0, closest.gpu_over) / _GIB:.1f} GiB over on the GPU and "
                     f"{max(0.0, closest.host_over) / _GIB:.1f} GiB over on the host)"]
        return (f"nothing fits {work.batch} × {work.length} tokens on {self.problem.layout.gpus} GPU(s): "
                f"{'; '.join(parts)}. Shorten the sequence, add GPUs (sp) or memory, or use --length max.")


def plan(problem: Problem, *, max_step_s: float | None = None) -> Plan:
    """The fastest configuration that fits `problem` at its length."""
    chosen = search.fastest(problem, max_step_s)
    if chosen is not None:
        return Plan(problem=problem, chosen=chosen, max_step_s=max_step_s)
    short = search.shortfall(problem)
    limit = "step time" if short.closest.fits else short.limit
    return Plan(problem=problem, chosen=None, short=short, limit=limit, max_step_s=max_step_s)


def plan_longest(problem: Problem, *, max_step_s: float | None = None) -> Plan:
    """The longest length that fits (a multiple of search.LENGTH_STEP), planned; the limit names what stops it."""
    longest = search.longest_length(problem, max_step_s)
    short = search.shortfall(problem.with_length(longest + search.LENGTH_STEP))
    limit = "step time" if short.closest.fits else short.limit
    result = plan(problem.with_length(longest or search.LENGTH_STEP), max_step_s=max_step_s)
    result.longest, result.limit = longest, limit
    return result


def default_ring(shape: ModelShape, sp: int, gpus_per_host: int) -> int:
    """init_mesh's default split: Ulysses as wide as the heads and one host allow, ring for the rest."""
    ulysses = max(u for u in range(1, sp + 1) if sp % u == 0 and u <= max(gpus_per_host, 1)
                  and shape.heads % u == 0 and (shape.kv_heads % u == 0 or u % shape.kv_heads == 0))
    return sp // ulysses


def machine_for(card: Card | str = "h200", *, gpu_memory_gib: float | None = None,
                host_memory_gib: float | None = None, gpus_per_host: int = 1) -> Machine:
    """A Machine with the card's defaults for what is not given (its memory; the host of its machines)."""
    card = load_card(card) if isinstance(card, str) else card
    if host_memory_gib is None:
        sizes = {int(k): v for k, v in card.host_memory_gib.items()}
        fitting = [n for n in sorted(sizes) if n >= gpus_per_host]
        if not fitting:
            raise PlanError(f"no host size is stored for {gpus_per_host} GPUs per host on {card.name}; pass "
                            "--host-mem-gib.")
        host_memory_gib = sizes[fitting[0]]
    return Machine(card=card, gpu_memory_gib=gpu_memory_gib or card.gpu_memory_gib,
                   host_memory_gib=host_memory_gib, gpus_per_host=gpus_per_host)


def detect_machine() -> Machine:
    """This machine: the card by torch's device name, its memory, MemTotal, and the processes per host."""
    import torch

    if not torch.cuda.is_available():
        raise PlanError("no CUDA device: pass a Machine (e.g. machine_for('h200')) to plan for a GPU.")
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    with open("/proc/meminfo") as fh:
        total = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    return Machine(card=load_card(properties.name), gpu_memory_gib=properties.total_memory / _GIB,
                   host_memory_gib=total / _GIB, gpus_per_host=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def plan_for(model_config, mesh, batch_shape: tuple[int, int], machine: Machine | None = None, *,
             training: str = "full", longest_document: int | None = None, fsdp_cpu_offload: bool | None = None,
             dtype_bytes: int = 2, offload_min_bytes: int = 1 << 20):
    """The MemoryConfig of the fastest configuration that fits: model_config an HF config, mesh a longseq Mesh
    (sp, ring, dp), batch_shape (sequences per data-parallel rank, tokens per sequence); fsdp_cpu_offload as
    Workload's, dtype_bytes and offload_min_bytes as Problem's. Raises PlanError, naming the budget that is short,
    when nothing fits."""
    batch, length = batch_shape
    problem = Problem(shape=shape_from_config(model_config), layout=Layout(sp=mesh.sp, ring=mesh.ring, dp=mesh.dp),
                      workload=Workload(length=length, batch=batch, training=training,
                                        longest_document=longest_document, fsdp_cpu_offload=fsdp_cpu_offload),
                      machine=machine or detect_machine(), dtype_bytes=dtype_bytes, offload_min_bytes=offload_min_bytes)
    return plan(problem).memory_config()


def settings(result: Plan) -> dict:
    """The chosen configuration as `longseq train` keys: memory.* (MemoryConfig) and training.cpu_offload."""
    choice = result.chosen.choice
    kwargs = memory_config_kwargs(choice, result.host_budget_bytes(), result.problem.offload_min_bytes)
    memory = {f"memory.{k}": v for k, v in kwargs.items()}
    if result.problem.workload.training == "full":
        memory["training.cpu_offload"] = choice.fsdp_cpu_offload
    return memory


def tokens_per_second(result: Plan) -> float:
    """Tokens of the whole step (all dp groups) per second."""
    problem = result.problem
    tokens = problem.workload.batch * problem.workload.length * problem.layout.dp
    return tokens / result.chosen.time.seconds if result.chosen.time.seconds > 0 else math.inf
