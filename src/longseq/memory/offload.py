"""Activation checkpointing of every decoder layer, with the checkpointed inputs held in host memory.

Note [Checkpoint offload]
~~~~~~~~~~~~~~~~~~~~~~~~~
With every layer checkpointed, what stays alive from forward to backward is each layer's input (B × S × H per
layer: Llama-3-8B at 128k tokens, 32 layers × 1 GB in bf16). We keep those in host memory instead:

    forward,  layer i:  checkpoint saves x_i ──pack──> side stream: copy to pinned host, event; GPU copy freed
    backward, layer i:  recompute needs x_i ──unpack─> wait for x_i's host→GPU copy (started one layer earlier),
                                                      start x_{i-1}'s host→GPU copy on the side stream
                        layer i's backward ends ──> x_i's GPU copy and its host copy are both released

The side stream first waits for the compute stream (x_i must be written before it is read), `record_stream` keeps
the caching allocator from reusing x_i's memory before the copy has read it, and the restored tensor is allocated
on the side stream and then recorded on the compute stream, which waits on the copy's event. Nothing holds a
restored tensor after its layer's recompute except the recomputed graph itself, so it goes away with that
layer's backward (DeepSpeed's offload keeps every restored checkpoint on the GPU until the whole backward ends).

Only the tensors that `torch.utils.checkpoint` itself saves pass through the hooks: the layer's positional inputs
(hidden_states). Tensors smaller than `offload_min_bytes`, parameters, non-float tensors and tensors already saved
by an earlier layer of the same forward (still alive, so shared: moving them would free nothing) stay on the
device. The last `keep_last_layers_on_gpu` layers are not offloaded: backward needs them first.

On a machine without CUDA the same code runs with ordinary host copies and no streams, which is how its
exactness is tested.

Note [Attention output cache]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Recomputing a layer in backward repeats its attention forward: at long lengths, where attention dominates, that is
about 1/4.5 of all attention work (forward 1, backward 2.5, recompute 1), and with a ring, R − 1 more K/V exchanges.
The attention's backward needs only its inputs (recomputed anyway), its output and log-sum-exp. So the attention of
longseq's block kernels (parallel/ring.py, R ≥ 1) calls `cached_attention(compute)`:

    layer forward:    compute() → (out, lse); both are kept like the checkpoint itself (pinned host copies, the
                      last k layers on the GPU), in a list that belongs to this one checkpoint call
    layer recompute:  (out, lse) are taken from that list instead of calling compute(); their host→GPU copy starts
                      when the recompute begins, and the next (earlier) layer's when this one's begins

`torch.utils.checkpoint`'s context_fn enters one context around the forward and another around the recompute,
which is how the two are told apart; the list belongs to one checkpoint call, so any number of forwards may be in
flight. Host memory: the output has the size of the layer's input (for Llama, heads · head_dim = hidden), so the
checkpoints' host memory doubles. A pair is kept only where the host budget (below) has room for it and for the
checkpoints of the layers still to come; the others are recomputed (`OffloadStats.attention_not_kept` counts them).
MemoryConfig.cache_attention=False turns it off.

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
checkpoints free GPU memory and the cache only saves time, and a GPU out of memory is a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import types
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longseq.config import MemoryConfig
from longseq.memory.tiled import decoder_layers

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")
_HOST_FULL = (
    "longseq: the host budget for offloaded checkpoints ({:.1f} GiB) is full, so further checkpoints stay on the GPU "
    "(which may run out of memory). Set MemoryConfig.host_memory_gib if the host has more room, or shorten the "
    "sequence; see Note [Host budget] in longseq/memory/offload.py."
)
_DOUBLE_CHECKPOINT = (
    "MemoryConfig.offload_checkpoints=True checkpoints every decoder layer itself, and HF gradient checkpointing "
    "is on too (it would checkpoint each layer twice). Call model.activation_checkpointing_disable() (older "
    "transformers: model.gradient_checkpointing_disable()), or set offload_checkpoints=False to keep HF's."
)


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


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class _Offloaded:
    """A saved tensor's host copy, plus its device copy while it is being brought back."""

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
        nbytes = _nbytes(self.host)
        stats._add(nbytes)
        weakref.finalize(self, stats._release, nbytes)

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


class _KeptAttention:
    """The attention (out, lse) pairs of one checkpointed layer call, kept from its forward for its recompute."""

    def __init__(self, offloader: _Offloader, index: int, earlier):
        self.offloader, self.index, self.earlier = offloader, index, earlier
        self.offload = index < offloader.first_kept
        self.pairs: list[list] = []
        self.replayed = 0  # pairs taken by the recompute in progress (a retained graph may recompute again)

    def keep(self, tensors: tuple[torch.Tensor, ...]) -> None:
        offloader = self.offloader
        move = [self.offload and _nbytes(t) >= offloader.min_bytes for t in tensors]
        moved = sum(_nbytes(t) for t, m in zip(tensors, move) if m)
        if moved and not offloader.host_has_room(moved + offloader.checkpoint_bytes_after(self.index)):
            offloader.stats.attention_not_kept += 1
            self.pairs.append(None)  # the recompute computes this one
            return
        self.pairs.append([_Offloaded(t, offloader._stream_for(t), offloader.stats) if m else t
                           for t, m in zip(tensors, move)])

    def prefetch(self) -> None:
        for pair in filter(None, self.pairs):
            for handle in pair:
                if isinstance(handle, _Offloaded):
                    handle.prefetch()

    def take(self) -> tuple[torch.Tensor, ...] | None:
        """The next kept pair, or None where the forward could not keep it."""
        if self.replayed == len(self.pairs):
            raise RuntimeError("longseq: a layer's recompute called attention more often than its forward did.")
        pair = self.pairs[self.replayed]
        self.replayed += 1
        if pair is None:
            return None
        return tuple(h.take(self.offloader.stats) if isinstance(h, _Offloaded) else h for h in pair)


HOST_SHARE = 0.9  # of MemTotal, for all processes on the host together (Note [Host budget])


def _host_total() -> int | None:
    """MemTotal in bytes from /proc/meminfo; None where there is none (not Linux)."""
    return _meminfo_bytes("/proc/meminfo", "MemTotal")


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


_phase = threading.local()  # (the layer call's _KeptAttention, replaying?) while a checkpointed layer runs


class _AttentionPhase:
    """Marks a checkpointed layer's forward or its recompute; reusable, as a retained graph recomputes again."""

    def __init__(self, kept: _KeptAttention, replay: bool):
        self.kept, self.replay, self.prior = kept, replay, None

    def __enter__(self):
        if self.replay:
            self.kept.replayed = 0
            self.kept.prefetch()
            earlier = self.kept.earlier() if self.kept.earlier is not None else None
            if earlier is not None:
                earlier.prefetch()
        self.prior = getattr(_phase, "value", None)
        _phase.value = (self.kept, self.replay)

    def __exit__(self, *exc):
        _phase.value = self.prior


def cached_attention(compute):
    """`compute() -> (out, lse)`, kept in a checkpointed layer's forward and replayed in its recompute; see
    Note [Attention output cache]. Outside such a layer it just calls compute()."""
    phase = getattr(_phase, "value", None)
    if phase is None:
        return compute()
    kept, replay = phase
    if replay:
        pair = kept.take()
        return pair if pair is not None else compute()
    result = compute()
    kept.keep(result)
    return result


class _Offloader:
    """Per-model state: the side stream, the stats, and the chain of handles of the forward in progress."""

    def __init__(self, config: MemoryConfig, num_layers: int):
        self.min_bytes = config.offload_min_bytes
        self.first_kept = num_layers - config.keep_last_layers_on_gpu
        self.cache_attention = config.cache_attention
        self.budget_gib = config.host_memory_gib
        self.reserved = 0  # bytes the step allocates on the host later (reserve_host_memory)
        self.budget_fixed = False
        self.layer_bytes: dict[int, int] = {}  # checkpoint bytes offloaded per layer, this forward
        self.stats = OffloadStats()
        self.stream = None
        self.last = None
        self.last_attention = None
        self.saved = weakref.WeakValueDictionary()

    def host_has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit in the host budget (Note [Host budget]); the first call fixes the budget."""
        if not self.budget_fixed:
            self.budget_fixed = True
            self.stats.budget_bytes = (int(self.budget_gib * 2**30) if self.budget_gib is not None
                                       else _automatic_budget(self.reserved))
        budget = self.stats.budget_bytes
        return budget is None or self.stats.current_bytes + nbytes <= budget

    def checkpoint_bytes_after(self, index: int) -> int:
        """Host bytes the checkpoints of the offloaded layers after `index` will take, if sized like layer index's."""
        return max(0, self.first_kept - index - 1) * self.layer_bytes.get(index, 0)

    def _stream_for(self, x: torch.Tensor):
        if x.device.type != "cuda":
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        return self.stream

    def _should_offload(self, x: torch.Tensor) -> bool:
        shared = self.saved.get(x.untyped_storage().data_ptr()) is not None
        return not (
            shared
            or isinstance(x, nn.Parameter)
            or not x.is_floating_point()
            or _nbytes(x) < self.min_bytes
        )

    def hooks(self, index: int) -> torch.autograd.graph.saved_tensors_hooks:
        """Pack/unpack hooks for layer `index`'s checkpoint; layer 0 starts a new forward."""
        if index == 0:
            self.last, self.last_attention, self.saved = None, None, weakref.WeakValueDictionary()
            self.layer_bytes = {}
        previous = self.last
        offload = index < self.first_kept

        def pack(x: torch.Tensor):
            move = offload and self._should_offload(x)
            self.saved[x.untyped_storage().data_ptr()] = x
            if move and not self.host_has_room(_nbytes(x)):
                if not self.stats.checkpoints_on_device:
                    warnings.warn(_HOST_FULL.format(self.stats.budget_bytes / 2**30), stacklevel=2)
                self.stats.checkpoints_on_device += 1
                move = False
            if not move:
                return x
            self.layer_bytes[index] = self.layer_bytes.get(index, 0) + _nbytes(x)
            handle = _Offloaded(x, self._stream_for(x), self.stats)
            self.last = weakref.ref(handle)
            return handle

        def unpack(packed):
            x = packed.take(self.stats) if isinstance(packed, _Offloaded) else packed
            earlier = previous() if previous is not None else None
            if earlier is not None:
                earlier.prefetch()
            return x

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def attention_contexts(self, index: int):
        """checkpoint's context_fn for layer `index`: keep attention outputs in forward, replay them in recompute."""
        if not self.cache_attention:
            return contextlib.nullcontext(), contextlib.nullcontext()
        kept = _KeptAttention(self, index, self.last_attention)
        self.last_attention = weakref.ref(kept)
        return _AttentionPhase(kept, replay=False), _AttentionPhase(kept, replay=True)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    if getattr(self, "gradient_checkpointing", False):
        raise RuntimeError(_DOUBLE_CHECKPOINT)
    plain = self._longseq_inner_forward
    if not (self.training and torch.is_grad_enabled()):
        return plain(*args, **kwargs)
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    offloader, index = self._longseq_offload
    with offloader.hooks(index):
        return checkpoint(functools.partial(plain, **kwargs), *args, use_reentrant=False,
                          context_fn=functools.partial(offloader.attention_contexts, index))


def apply_checkpoint_offload(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Checkpoint every decoder layer and hold its saved input in host memory (Note [Checkpoint offload])."""
    layers = decoder_layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError(_DOUBLE_CHECKPOINT)
    if any(hasattr(layer, "_longseq_offload") for layer in layers):
        raise ValueError("apply_checkpoint_offload was already applied to this model; apply it once.")
    offloader = _Offloader(config, len(layers))
    for index, layer in enumerate(layers):
        layer._longseq_offload = (offloader, index)
        layer._longseq_inner_forward = layer.forward  # the class's, or whatever an earlier wrapper installed
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    model._longseq_offloader = offloader
    return model


def reserve_host_memory(model: nn.Module, nbytes: int) -> None:
    """Tell the offloader that the training step will allocate `nbytes` more of host memory after its first forward
    (CPU-offloaded gradients and optimizer state), so its automatic host budget leaves room for them. Call it before
    the first forward; see Note [Host budget]."""
    offloader = getattr(model, "_longseq_offloader", None)
    if offloader is None:
        return  # nothing offloaded, nothing to budget
    if offloader.budget_fixed:
        raise RuntimeError("reserve_host_memory: call it before the model's first forward; the host budget is fixed.")
    offloader.reserved += nbytes


def offload_stats(model: nn.Module) -> OffloadStats:
    """Host bytes held by offloaded checkpoints now and at peak (reset with `offload_stats(model).peak_bytes = 0`)."""
    offloader = getattr(model, "_longseq_offloader", None)
    if offloader is None:
        raise ValueError("offload_stats: apply_checkpoint_offload(model, config) was not applied to this model.")
    return offloader.stats
