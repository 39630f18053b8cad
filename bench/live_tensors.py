"""What each live tensor at a step's peak is, on a machine without CUDA: a dispatch mode that follows every storage
an operator allocates until it is freed, and keeps the set alive at the highest total.

The CUDA memory history (bench/memory_snapshot.py on a GPU) is the measurement; this is its CPU stand-in for working
on memory without a GPU. It sees what operators return (activations, saved tensors, gradients, restored copies), not
buffers a kernel allocates and frees inside itself (cuDNN's workspace and fp32 accumulators): those it cannot show.
Each storage is named by the innermost longseq or transformers frame that allocated it and, in backward, by the
autograd node running (e.g. `MmBackward0`); the shapes of a name's tensors are listed beside it.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _site(excluded) -> str | None:
    """Where the current allocation comes from; None when `excluded(filename, function)` says it is not device
    memory (host copies of offloaded tensors)."""
    frame, inner = sys._getframe(2), None
    while frame is not None:
        name, function = frame.f_code.co_filename, frame.f_code.co_name
        if excluded(name, function):
            return None
        if inner is None and ("/longseq/" in name or "/transformers/" in name):
            short = name.split("/longseq/")[-1] if "/longseq/" in name else "hf/" + name.split("/transformers/")[-1]
            inner = f"{short}:{frame.f_lineno}:{function}"
        frame = frame.f_back
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"{inner or 'autograd'} [{node.name()}]"
    return inner or "other"


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of storages allocated under it while they live; `peak`, `at_peak` (site -> bytes),
    `shapes` (site -> the shapes of its tensors at the peak), `peak_op` (the operator and autograd node that
    reached it), `node_peaks` (autograd node -> the most bytes live while it ran: the peak of each phase) and
    `node_at_peak` (what was alive then)."""

    def __init__(self, excluded=lambda filename, function: False):
        super().__init__()
        self.excluded = excluded
        self.live: dict[int, tuple[StorageWeakRef, int, str, tuple]] = {}
        self.ignored: dict[int, StorageWeakRef] = {}  # storages of excluded allocations (and views of them)
        self.total = self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.shapes: dict[str, list[tuple]] = {}
        self.peak_op = ""
        self.node_peaks: dict[str, int] = {}  # autograd node (or "forward") -> the most bytes live while it ran
        self.node_at_peak: dict[str, dict[str, int]] = {}  # and what was alive then (site -> bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor)
        node = torch._C._current_autograd_node()
        phase = node.name() if node is not None else "forward"
        if self.total > self.node_peaks.get(phase, -1):
            self.node_peaks[phase] = self.total
            self.node_at_peak[phase] = self._by_site()[0]
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak, self.shapes = self._by_site()
            self.peak_op = f"{func} in {phase}"
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.ignored or storage.nbytes() == 0:
            return
        site = _site(self.excluded)
        if site is None:
            self.ignored[key] = StorageWeakRef(storage)
            return
        self.live[key] = (StorageWeakRef(storage), storage.nbytes(), site, tuple(tensor.shape))
        self.total += storage.nbytes()

    def _sweep(self) -> None:
        for key in [key for key, (ref, *_) in self.live.items() if ref.expired()]:
            self.total -= self.live.pop(key)[1]
        for key in [key for key, ref in self.ignored.items() if ref.expired()]:
            del self.ignored[key]

    def _by_site(self) -> tuple[dict[str, int], dict[str, list[tuple]]]:
        groups: dict[str, int] = defaultdict(int)
        shapes: dict[str, list[tuple]] = defaultdict(list)
        for _, nbytes, site, shape in self.live.values():
            groups[site] += nbytes
            shapes[site].append(shape)
        return dict(groups), dict(shapes)


class BackwardAllocations(TorchDispatchMode):
    """Bytes of the tensors that operators return while an autograd node runs (the backward's memory traffic)."""

    bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_autograd_node() is not None:
            self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out
