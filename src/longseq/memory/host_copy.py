"""A tensor's copy in host memory and its way back to the device, and the count of host bytes the copies hold.

Both the checkpoint offload (Note [Checkpoint offload]) and the attention output cache (Note [Attention output
cache]) move tensors this way: to pinned host memory on a side stream, back one layer ahead of their use.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class OffloadStats:
    """Host memory held by offloaded checkpoints."""

    current_bytes: int = 0
    peak_bytes: int = 0
    offloaded_tensors: int = 0
    """Tensors moved to host since the model was wrapped."""
    prefetch_hits: int = 0
    """Restores whose copy had already been started one layer ahead (the others waited for a synchronous copy)."""
    attention_not_kept: int = 0
    """Attention outputs recomputed in backward because the host budget was full (Note [Host budget])."""
    checkpoints_on_device: int = 0
    """Checkpoints left on the device because the host budget was full (Note [Host budget])."""
    budget_bytes: int | None = None
    """The host budget, fixed at the first offload; None: unbounded (no /proc/meminfo) or not yet fixed."""

    def _add(self, nbytes: int) -> None:
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self.offloaded_tensors += 1

    def _release(self, nbytes: int) -> None:
        self.current_bytes -= nbytes


def nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class HostCopy:
    """A saved tensor's host copy, plus its device copy while it is being brought back. The host bytes count in
    `stats` until the handle is gone. On a machine without CUDA (stream None): plain host copies, no streams."""

    def __init__(self, x: torch.Tensor, stream, stats: OffloadStats):
        self.device, self.stream = x.device, stream
        with torch.no_grad():
            if stream is None:
                self.host, self.event = x.detach().to("cpu", copy=True), None
            else:
                self.host = torch.empty_like(x, device="cpu", pin_memory=True)
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):
                    self.host.copy_(x, non_blocking=True)
                    x.record_stream(stream)
                    self.event = stream.record_event()
        self.restored = None
        size = nbytes(self.host)
        stats._add(size)
        weakref.finalize(self, stats._release, size)

    def prefetch(self) -> None:
        """Start the copy back to the device (on the side stream when there is one)."""
        if self.restored is not None:
            return
        if self.stream is None:
            self.restored = self.host.to(self.device, copy=True)
            return
        with torch.cuda.stream(self.stream):
            self.restored = torch.empty_like(self.host, device=self.device)
            self.restored.copy_(self.host, non_blocking=True)
            self.event = self.stream.record_event()

    def take(self, stats: OffloadStats) -> torch.Tensor:
        """The device copy, ready for the compute stream; this handle forgets it (see Note [Checkpoint offload])."""
        stats.prefetch_hits += self.restored is not None
        self.prefetch()
        restored, self.restored = self.restored, None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self.event)
            restored.record_stream(compute)
        return restored
