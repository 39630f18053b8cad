"""What a plan is asked about: the model, how ranks split it, the batch, the training mode and the machine."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from longseq.plan.card import Card
from longseq.plan.errors import PlanError
from longseq.plan.shapes import ModelShape

TRAINING = ("full", "lora", "forward-backward")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Ranks: sequence parallelism sp = ulysses × ring, data parallelism dp; sp × dp GPUs."""

    sp: int = 1
    """Sequence-parallel degree (ranks sharing one sequence)."""
    ring: int = 1
    """Ring-attention degree inside sp; Ulysses gets sp // ring."""
    dp: int = 1
    """Data-parallel degree."""

    def __post_init__(self) -> None:
        for name in ("sp", "ring", "dp"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.sp % self.ring:
            raise PlanError(f"ring={self.ring} must divide sp={self.sp} (sp = ulysses × ring).")

    @property
    def ulysses(self) -> int:
        return self.sp // self.ring

    @property
    def gpus(self) -> int:
        return self.sp * self.dp


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One micro-step's batch and what is trained."""

    length: int
    """Tokens per sequence (before sharding over sp)."""
    batch: int = 1
    """Sequences per micro-step on each data-parallel group."""
    longest_document: int | None = None
    """Packed documents: the longest document's length (attention work and kernel buffers follow documents);
    None: one document per sequence."""
    training: str = "full"
    """'full' (FSDP2, fp32 master weights and AdamW, as `longseq train`), 'lora' (frozen bf16 weights and small
    adapters), or 'forward-backward' (bf16 weights and gradients on the GPU, no optimizer: the benchmarks' setup)."""
    lora_rank: int = 16
    """Rank of the LoRA adapters on every projection (training='lora')."""
    fsdp_cpu_offload: bool | None = None
    """training='full': FSDP2's CPU offload fixed on or off (it is decided when the model is sharded, so
    `longseq.apply(..., "auto")` plans with the trainer's training.cpu_offload); None: the plan chooses."""

    def __post_init__(self) -> None:
        if self.length < 1 or self.batch < 1:
            raise PlanError(f"length={self.length} and batch={self.batch} must be positive.")
        if self.training not in TRAINING:
            raise PlanError(f"training={self.training!r}: choose one of {', '.join(TRAINING)}.")
        if self.longest_document is not None and not 1 <= self.longest_document:
            raise PlanError(f"longest_document={self.longest_document} must be a positive number of tokens.")

    @property
    def document(self) -> int:
        """The longest document, at most the sequence."""
        return min(self.length, self.longest_document or self.length)


@dataclass(frozen=True, kw_only=True)
class Machine:
    """The GPUs and hosts a plan must fit in."""

    card: Card
    """Calibration of the GPU kind (plan/cards/)."""
    gpu_memory_gib: float
    """Memory of one GPU the process may use (e.g. 79 to plan for an 80 GB card on an H200)."""
    host_memory_gib: float
    """Memory of one host (MemTotal)."""
    gpus_per_host: int = 1
    """GPUs (one process each) sharing a host's memory."""
    gpu_headroom: float = 0.05
    """Share of GPU memory left free for the allocator's fragmentation and CUDA's own workspaces."""
    host_share: float = 0.9
    """Share of host memory the processes of a host may fill (as the offloader's automatic budget does)."""

    def __post_init__(self) -> None:
        if self.gpu_memory_gib <= 0 or self.host_memory_gib <= 0 or self.gpus_per_host < 1:
            raise PlanError("gpu_memory_gib, host_memory_gib and gpus_per_host must be positive.")

    @property
    def gpu_limit(self) -> float:
        """Bytes one rank's allocations may reach."""
        return self.gpu_memory_gib * (1 - self.gpu_headroom) * 2**30

    @property
    def host_limit(self) -> float:
        """Bytes the processes of one host may hold together."""
        return self.host_memory_gib * self.host_share * 2**30


@dataclass(frozen=True, kw_only=True)
class Problem:
    """Everything a plan depends on except its own choices."""

    shape: ModelShape
    layout: Layout
    workload: Workload
    machine: Machine
    dtype_bytes: int = 2
    """Bytes per element of the compute dtype (bf16)."""
    offload_min_bytes: int = 1 << 20
    """MemoryConfig.offload_min_bytes: smaller saved tensors stay on the GPU."""

    def __post_init__(self) -> None:
        check_heads(self.shape, self.layout.ulysses)

    @property
    def tokens(self) -> int:
        """Tokens one rank holds in a micro-step: batch × length / sp, the length padded as shard_batch pads it."""
        multiple = 2 * self.layout.sp if self.layout.ring > 1 else self.layout.sp
        padded = math.ceil(self.workload.length / multiple) * multiple
        return self.workload.batch * padded // self.layout.sp

    @property
    def ranks_per_host(self) -> int:
        return min(self.machine.gpus_per_host, self.layout.gpus)

    def with_length(self, length: int) -> Problem:
        return replace(self, workload=replace(self.workload, length=length))


def check_heads(shape: ModelShape, ulysses: int) -> None:
    """The Ulysses degree must split the query heads, and split or replicate the KV heads (parallel/ulysses.py)."""
    if shape.heads % ulysses:
        raise PlanError(f"Ulysses degree {ulysses} does not divide the {shape.heads} attention heads; use ring "
                        "attention for the rest (--ring).")
    if shape.kv_heads % ulysses and ulysses % shape.kv_heads:
        raise PlanError(f"Ulysses degree {ulysses} and the {shape.kv_heads} KV heads do not divide one another; "
                        "choose --ring so that sp // ring divides or is a multiple of them.")
