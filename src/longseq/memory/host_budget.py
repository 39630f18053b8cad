"""How much host memory the offloader may fill.

Note [Host budget]
~~~~~~~~~~~~~~~~~~
A host out of memory kills the run, so what this offloader holds on the host (checkpoints, then kept attention
outputs) stays within a budget fixed at the first offload: MemoryConfig.host_memory_gib, or else this process's
share of 90% of the host (MemTotal over LOCAL_WORLD_SIZE processes) less its resident memory at that moment and
less what `reserve_host_memory` was told the step will still allocate (the trainer's CPU-offloaded gradients and
AdamW state, which appear only in backward and at the first optimizer step). A fixed budget rather than a look at
MemAvailable each time: pinned blocks freed in backward stay cached by CUDA's host allocator and are reused by the
next step, so the free memory the kernel reports says little about what the next step needs. Beyond the budget,
attention outputs are not kept first, then checkpoints stay on the GPU (`OffloadStats.checkpoints_on_device`):
checkpoints free GPU memory and the cache only saves time, and a GPU out of memory is a clear error. The budget is
the limit of the offloader's host arena (Note [Host arena]), which holds every host copy: what the process pins for
offloading never exceeds it, whatever lengths it runs.
"""

from __future__ import annotations

import os

from torch import nn

from longseq.state import longseq_state

HOST_SHARE = 0.9  # of MemTotal, for all processes on the host together


class HostBudget:
    """The host bytes an offloader may hold: fixed the first time it is asked (Note [Host budget])."""

    def __init__(self, gib: float | None):
        self.gib = gib
        self.reserved = 0  # bytes the step allocates on the host later (reserve_host_memory)
        self.fixed = False
        self.limit: int | None = None
        self.automatic: int | None = None  # the automatic budget, once worked out

    def fix(self) -> int | None:
        """The budget in bytes (None: unbounded); the first call fixes it."""
        if not self.fixed:
            self.fixed = True
            if self.gib is None and self.automatic is None:
                self.automatic = _automatic_budget(self.reserved)
            self.limit = int(self.gib * 2**30) if self.gib is not None else self.automatic
        return self.limit

    def set(self, gib: float | None) -> None:
        """A new MemoryConfig.host_memory_gib (a new batch shape's plan, Note [Automatic memory]); the automatic
        budget, where it returns to None, is the one worked out first."""
        self.gib = gib
        if self.fixed:
            self.fixed = False
            self.fix()


def _host_total() -> int | None:
    """MemTotal in bytes from /proc/meminfo; None where there is none (not Linux)."""
    return _meminfo_bytes("/proc/meminfo", "MemTotal")


def host_total_gib() -> float:
    """MemTotal in GiB (64 where /proc/meminfo is missing: not Linux)."""
    total = _host_total()
    return total / 2**30 if total is not None else 64.0


def _resident_bytes() -> int:
    """This process's resident memory (VmRSS, pinned pages included), bytes."""
    return _meminfo_bytes("/proc/self/status", "VmRSS") or 0


def _meminfo_bytes(path: str, field: str) -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _automatic_budget(reserved: int) -> int | None:
    total = _host_total()
    if total is None:
        return None
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, int(HOST_SHARE * total) // processes - _resident_bytes() - reserved)


def reserve_host_memory(model: nn.Module, nbytes: int) -> None:
    """Tell the offloader that the training step will allocate `nbytes` more of host memory after its first forward
    (CPU-offloaded gradients and optimizer state), so its automatic host budget leaves room for them. Call it before
    the first forward; see Note [Host budget]."""
    state = longseq_state(model)
    if state is None or state.offloader is None:
        return  # nothing offloaded, nothing to budget
    budget = state.offloader.budget
    if budget.fixed:
        raise RuntimeError("reserve_host_memory: call it before the model's first forward; the host budget is fixed.")
    budget.reserved += nbytes
