"""Process groups for data parallelism (dp) and sequence parallelism (sp = ulysses × ring).

Rank layout (innermost first): ulysses, ring, dp. So
    rank = dp_rank * sp + ring_rank * ulysses + ulysses_rank
Consecutive ranks share a node under torchrun, so the all-to-all of Ulysses stays on the fastest links and
the ring's point-to-point traffic is what crosses nodes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class Mesh:
    """This rank's place in the dp × ring × ulysses grid and the process groups it talks over."""

    world_size: int = 1
    rank: int = 0
    dp: int = 1
    sp: int = 1
    ulysses: int = 1
    ring: int = 1
    device: torch.device = torch.device("cpu")
    sp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    ring_group: dist.ProcessGroup | None = None

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses


def init_mesh(
    sp: int | None = None,
    dp: int | None = None,
    *,
    ring: int | None = None,
    model=None,
    backend: str | None = None,
) -> Mesh:
    """Build the dp × sp mesh over all processes.

    sp: sequence-parallel degree (default: every rank, or world_size // dp when dp is given).
    dp: data-parallel degree (default: world_size // sp).
    ring: ring degree inside sp; the Ulysses degree is sp // ring. Default: Ulysses as wide as the
        model's heads allow (pass `model` or its config) and ring for the rest; pure Ulysses without a model.
    backend: process-group backend when longseq initialises torch.distributed itself (default nccl on CUDA, else gloo).
    """
    if not init_distributed(backend) and not dist.is_initialized():
        if (sp or 1) > 1 or (dp or 1) > 1:
            raise RuntimeError(
                f"init_mesh(sp={sp}, dp={dp}) needs {max(sp or 1, 1) * max(dp or 1, 1)} processes, but "
                "torch.distributed is not initialised. Launch with `torchrun --nproc-per-node N ...` "
                "or call torch.distributed.init_process_group first."
            )
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sp, dp = _resolve_degrees(world, sp, dp)
    ulysses, ring = _resolve_split(sp, ring, model)
    device = _local_device()
    if world == 1:
        return Mesh(device=device)
    groups = _build_groups(world, rank, sp, ulysses)
    return Mesh(world_size=world, rank=rank, dp=dp, sp=sp, ulysses=ulysses, ring=ring, device=device, **groups)


def under_torchrun() -> bool:
    """True in a process that torchrun (or a launcher setting the same variables) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None, *, one_process: bool = False) -> bool:
    """Start torch.distributed the one way longseq does; True if this call started it.

    Under torchrun: join its group (env://) on the local GPU. Otherwise, with one_process, a group of one (FSDP2 and
    torch.distributed.checkpoint want one; an in-memory store needs no port); else nothing. Backend: nccl on CUDA,
    gloo on CPU. Collectives time out after LONGSEQ_TIMEOUT_MIN minutes (30), so a peer that hangs without exiting
    fails the run instead of stalling it forever.
    """
    if dist.is_initialized() or not (one_process or under_torchrun()):
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(minutes=int(os.environ.get("LONGSEQ_TIMEOUT_MIN", "30")))
    if under_torchrun():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return True


def _resolve_degrees(world: int, sp: int | None, dp: int | None) -> tuple[int, int]:
    for name, value in (("sp", sp), ("dp", dp)):
        if value is not None and value < 1:
            raise ValueError(f"init_mesh: {name}={value} must be a positive integer.")
    if sp is None:
        sp = world // dp if dp else world
    if sp > world:
        raise ValueError(
            f"init_mesh: sp={sp} is larger than the world size {world}. Launch {sp} processes "
            f"(torchrun --nproc-per-node {sp}) or lower sp."
        )
    if world % sp:
        raise ValueError(
            f"init_mesh: world size {world} is not divisible by sp={sp}. Choose sp among the divisors of "
            f"{world}: {[d for d in range(1, world + 1) if world % d == 0]}."
        )
    if dp is None:
        dp = world // sp
    if dp * sp != world:
        raise ValueError(f"init_mesh: dp={dp} × sp={sp} = {dp * sp} does not match the world size {world}.")
    return sp, dp


def _resolve_split(sp: int, ring: int | None, model) -> tuple[int, int]:
    """Ulysses and ring degrees with ulysses × ring = sp."""
    if ring is not None:
        if ring < 1 or sp % ring:
            raise ValueError(f"init_mesh: ring={ring} must divide sp={sp}; the Ulysses degree is sp // ring.")
        return sp // ring, ring
    if model is None:
        return sp, 1
    config = getattr(model, "config", model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", sp))
    ulysses = max(
        u for u in range(1, sp + 1)
        if sp % u == 0 and u <= max(local, 1) and heads % u == 0 and (kv_heads % u == 0 or u % kv_heads == 0)
    )
    return ulysses, sp // ulysses


def _build_groups(world: int, rank: int, sp: int, ulysses: int) -> dict:
    """Every rank must create every group, in the same order (torch.distributed.new_group's contract)."""
    ring = sp // ulysses

    def make(partitions):
        mine = None
        for ranks in partitions:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        return mine

    sp_blocks = [list(range(start, start + sp)) for start in range(0, world, sp)]
    return dict(
        sp_group=make(sp_blocks),
        dp_group=make([list(range(offset, world, sp)) for offset in range(sp)]),
        ulysses_group=make([b[i:i + ulysses] for b in sp_blocks for i in range(0, sp, ulysses)]),
        ring_group=make([b[u::ulysses] for b in sp_blocks for u in range(ulysses)]),
    )


def _local_device() -> torch.device:
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
