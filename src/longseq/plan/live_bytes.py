"""Peak bytes of live tensors on CPU: the CPU stand-in for torch.cuda.max_memory_allocated that bench/bench_plan.py
and tests/test_plan_measured.py compare the plan with, and what the plan measures longseq's Gated DeltaNet mixer by
(plan/linear.py).

    with LiveBytes() as live:
        step()
    live.peak       # the most bytes alive at once
    live.alive()    # what is still alive now: after a step, what it left behind

Every storage an ATen op allocates (an output that shares no input's storage) is counted until it is freed;
tensors made before the block are not: parameters, kept gradients, and the offloader's host arena (made in a first
step and reused; host copies are copies into it, Note [Host arena]). Buffers a kernel allocates for itself are
invisible here (the card's attention_workspace_bytes is 0 for the CPU).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, record: bool = False):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}  # data_ptr -> (ref, bytes, op)
        self.current = self.peak = 0
        self.record = record
        self.at_peak: list[tuple[str, int]] = []
        """With record: (op, bytes) of the storages alive at the peak."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            # Views and in-place results share an input's storage: nothing new (and parameters made before the
            # block must not be counted when first seen through a view).
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._track(tensor, str(func))
        return out

    def _track(self, tensor: torch.Tensor, op: str) -> None:
        storage = tensor.untyped_storage()
        nbytes, key = storage.nbytes(), storage.data_ptr()
        if nbytes == 0:
            return
        entry = self.live.get(key)
        if entry is not None and not entry[0].expired():
            return
        if entry is not None:
            self.current -= entry[1]
        self.live[key] = (StorageWeakRef(storage), nbytes, op)
        self.current += nbytes
        if self.current > self.peak:
            self._sweep()
            if self.current > self.peak:
                self.peak = self.current
                if self.record:
                    self.at_peak = [(op, n) for _, n, op in self.live.values()]

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (the peak of a later phase, e.g. a backward after its forward)."""
        self.peak = self.alive()

    def alive(self) -> int:
        """Bytes of the storages made inside the block that are still alive now (after it: what a step leaves)."""
        self._sweep()
        return self.current

    def _sweep(self) -> None:
        """Forget freed storages (only needed when a new peak might be set: freed ones only inflate the count)."""
        for key, (ref, nbytes, _) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
