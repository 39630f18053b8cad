"""Peak bytes of live tensors on CPU, split into "device" and offloaded "host" copies: the CPU stand-in for
torch.cuda.max_memory_allocated that bench/bench_plan.py and tests/test_plan_measured.py compare the plan with.

    with LiveBytes() as live:
        step()
    live.device_peak, live.host_peak

Every storage an ATen op allocates (an output that shares no input's storage) is counted until it is freed;
tensors made before the block, e.g. parameters and kept gradients, are not. Offloaded copies are recognised by how
the offloader makes them on a machine without CUDA: `x.to("cpu", copy=True)` of a device tensor (an aten._to_copy
with a device and no dtype change) is a host copy; the same op on a host copy is its restore, back on the "device".
Buffers a kernel allocates for itself are invisible here (the card's attention_workspace_bytes is 0 for the CPU).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, record: bool = False):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, bool, str]] = {}  # data_ptr -> (ref, bytes, host?, op)
        self.current = {False: 0, True: 0}
        self.peak = {False: 0, True: 0}
        self.record = record
        self.at_peak: list[tuple[str, int]] = []
        """With record: (op, bytes) of the device storages alive at the device peak."""

    @property
    def device_peak(self) -> int:
        return self.peak[False]

    @property
    def host_peak(self) -> int:
        return self.peak[True]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        host = (func is torch.ops.aten._to_copy.default and "device" in kwargs
                and kwargs.get("dtype", args[0].dtype) == args[0].dtype)
        if host and self._is_host(args[0]):
            host = False  # the restore of a host copy
        tensors = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            # Views and in-place results share an input's storage: nothing new (and parameters made before the
            # block must not be counted when first seen through a view).
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._track(tensor, host, str(func))
        return out

    def _is_host(self, tensor: torch.Tensor) -> bool:
        entry = self.live.get(tensor.untyped_storage().data_ptr())
        return entry is not None and not entry[0].expired() and entry[2]

    def _track(self, tensor: torch.Tensor, host: bool, op: str) -> None:
        storage = tensor.untyped_storage()
        nbytes, key = storage.nbytes(), storage.data_ptr()
        if nbytes == 0:
            return
        entry = self.live.get(key)
        if entry is not None and not entry[0].expired():
            return  # a view, or an in-place result
        if entry is not None:
            self.current[entry[2]] -= entry[1]
        self.live[key] = (StorageWeakRef(storage), nbytes, host, op)
        self.current[host] += nbytes
        if self.current[host] > self.peak[host]:
            self._sweep()
            if self.current[host] > self.peak[host]:
                self.peak[host] = self.current[host]
                if self.record and not host:
                    self.at_peak = [(op, n) for _, n, h, op in self.live.values() if not h]

    def _sweep(self) -> None:
        """Forget freed storages (only needed when a new peak might be set: freed ones only inflate the count)."""
        for key, (ref, nbytes, host, _) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current[host] -= nbytes
