"""A tensor's copy in host memory and its way back to the device, and the count of host bytes the copies hold.

Both the checkpoint offload (Note [Checkpoint offload]) and the attention output cache (Note [Attention output
cache]) move tensors this way: into pages of the offloader's host arena (Note [Host arena]) on a side stream, back
ahead of their use. A copy moves the tensor's memory as it lies (any dense layout, e.g. the (B, S, H, D) order of an
attention output seen as (B, H, S, D)), one piece per run of pages, and brings it back in the same layout.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from longseq.memory.host_arena import HostArena, Run


@dataclass
class OffloadStats:
    """Host memory held by offloaded checkpoints and kept attention outputs."""

    current_bytes: int = 0
    peak_bytes: int = 0
    offloaded_tensors: int = 0
    """Tensors moved to host since the model was wrapped."""
    prefetch_hits: int = 0
    """Restores whose copy had already been started ahead (the others waited for a synchronous copy)."""
    attention_not_kept: int = 0
    """Attention outputs recomputed in backward because the host budget was full, since the model was wrapped
    (Note [Host budget])."""
    checkpoints_on_device: int = 0
    """Checkpoints left on the device because the host budget was full, since the model was wrapped."""
    budget_bytes: int | None = None
    """The host budget, fixed at the first offload; None: unbounded (no /proc/meminfo) or not yet fixed."""
    arena_bytes: int = 0
    """Host memory the arena holds now (pinned with CUDA), live copies and free pages together (Note [Host arena])."""
    arena_peak_bytes: int = 0
    """The most the arena ever held; never more than budget_bytes."""
    layer_forwards_recomputed: int = 0
    """Layer forwards run again to rebuild the inputs of a checkpoint segment (Note [Checkpoint segments])."""

    def _add(self, nbytes: int) -> None:
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self.offloaded_tensors += 1

    def _release(self, nbytes: int) -> None:
        self.current_bytes -= nbytes


def nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _is_dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill one block of memory without gaps (its strides a permutation of a contiguous
    layout's)."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(x.shape, x.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _pieces(runs: list[Run], arena: HostArena, total: int):
    """(host view, byte offset in the tensor) of each run, the last one cut to the tensor's end."""
    offset = 0
    for run in runs:
        view = arena.view(run)[: total - offset]
        yield view, offset
        offset += view.numel()


class HostCopy:
    """A saved tensor's host copy, in pages of `arena`, plus its device copy while it is being brought back. The host
    bytes count in `stats` until the handle is gone. On a machine without CUDA (stream None): plain host copies."""

    def __init__(self, x: torch.Tensor, runs: list[Run], arena: HostArena, stream, stats: OffloadStats):
        self.device, self.stream, self.arena, self.runs = x.device, stream, arena, runs
        x = x.detach() if _is_dense(x) else x.detach().contiguous()
        self.dtype, self.shape, self.strides, self.size = x.dtype, x.shape, x.stride(), nbytes(x)
        source = x.as_strided((x.numel(),), (1,)).view(torch.uint8)
        if stream is None:
            self._copy_out(source)
        else:
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                self._copy_out(source)
                x.record_stream(stream)
                self.event = stream.record_event()
        self.restored = None
        stats._add(self.size)
        weakref.finalize(self, _release, arena, runs, stream, stats, self.size).atexit = False

    def _copy_out(self, source: torch.Tensor) -> None:
        for view, offset in _pieces(self.runs, self.arena, self.size):
            view.copy_(source[offset : offset + view.numel()], non_blocking=self.stream is not None)

    def prefetch(self) -> None:
        """Start the copy back to the device (on the side stream when there is one)."""
        if self.restored is not None:
            return
        if self.stream is None:
            self.restored = self._copy_in()
            return
        with torch.cuda.stream(self.stream):
            self.restored = self._copy_in()
            self.event = self.stream.record_event()

    def _copy_in(self) -> torch.Tensor:
        flat = torch.empty(self.size, dtype=torch.uint8, device=self.device)
        for view, offset in _pieces(self.runs, self.arena, self.size):
            flat[offset : offset + view.numel()].copy_(view, non_blocking=self.stream is not None)
        return flat.view(self.dtype).as_strided(self.shape, self.strides)

    def take(self, stats: OffloadStats) -> torch.Tensor:
        """The device copy, ready for the compute stream; this handle forgets it (see Note [Checkpoint offload]), so
        a later take brings it back again."""
        stats.prefetch_hits += self.restored is not None
        self.prefetch()
        restored, self.restored = self.restored, None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self.event)
            restored.record_stream(compute)
        return restored


def _release(arena: HostArena, runs: list[Run], stream, stats: OffloadStats, size: int) -> None:
    """A HostCopy is gone: its pages go back to the arena once the side stream's copies are done with them."""
    arena.release(runs, stream.record_event() if stream is not None else None)
    stats._release(size)
