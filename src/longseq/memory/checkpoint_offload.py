"""Activation checkpointing of every decoder layer, with the checkpointed inputs held in host memory.

Note [Checkpoint offload]
~~~~~~~~~~~~~~~~~~~~~~~~~
With every layer checkpointed, what stays alive from forward to backward is each layer's input (B × S × H per
layer: Llama-3-8B at 128k tokens, 32 layers × 1 GB in bf16). We keep those in host memory instead:

    forward,  layer i:  checkpoint saves x_i ──pack──> side stream: copy to pinned host, event; GPU copy freed
    backward, layer i:  recompute needs x_i ──unpack─> wait for x_i's host→GPU copy (started during layer i+1)
                        attention backward done ──> start x_{i-1}'s host→GPU copy on the side stream
                        layer i's backward ends ──> x_i's GPU copy and its host copy are both released

The side stream first waits for the compute stream (x_i must be written before it is read), `record_stream` keeps
the caching allocator from reusing x_i's memory before the copy has read it, and the restored tensor is allocated
on the side stream and then recorded on the compute stream, which waits on the copy's event. Nothing holds a
restored tensor after its layer's recompute except the recomputed graph itself, so it goes away with that
layer's backward (DeepSpeed's offload keeps every restored checkpoint on the GPU until the whole backward ends).

Only the tensors that `torch.utils.checkpoint` itself saves pass through the hooks: the layer's positional inputs
(hidden_states), and on torch 2.11 an empty placeholder before them. Empty tensors, tensors smaller than
`offload_min_bytes`, parameters, non-float tensors and tensors already saved by an earlier layer of the same forward
(still alive, so shared: moving them would free nothing) stay on the device. The last `keep_last_layers_on_gpu` layers are not offloaded: backward needs them first.

When x_{i-1} starts coming back is a trade between memory and overlap. At the start of layer i's recompute (one
layer ahead: the most time to hide the copy) it sits on the GPU through layer i's attention backward, the step's
peak, with the earlier layer's kept attention output beside it: 16 KiB per token for the 8B shape (device call 20).
So by default (MemoryConfig.prefetch_after_attention) it starts once layer i's attention backward is done and
its saved tensors are released (a hook on the gradient of the attention's q calls the attention cache's
backward_done()), and a kept attention output when its own layer's recompute starts; the copies then overlap the
rest of layer i's backward and the start of layer i−1's recompute.
Layers whose attention did not go through the cache fall back to the start of the recompute.

On a machine without CUDA the same code runs with ordinary host copies and no streams, which is how its
exactness is tested. The host copies are host_copy.py's, in the pages of a host arena (Note [Host arena]); how many
bytes they may take is Note [Host budget] (host_budget.py); beside each checkpoint the layer's attention outputs may
be kept (Note [Attention output cache], attention_cache.py); one checkpoint may serve several layers (Note
[Checkpoint segments], checkpoint_segments.py).
"""

from __future__ import annotations

import functools
import types
import warnings
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longseq.memory.attention_cache import attention_phases
from longseq.memory.checkpoint_segments import CheckpointRecord, Segment, segment_hooks
from longseq.memory.config import MemoryConfig
from longseq.memory import host_arena
from longseq.memory.host_arena import HostArena
from longseq.memory.host_budget import HostBudget
from longseq.memory.host_copy import HostCopy, OffloadStats, nbytes
from longseq.models.anatomy import decoder_layers
from longseq.state import LongseqState, attach_state, longseq_state

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")
_HOST_FULL = (
    "longseq: the host budget for offloaded checkpoints ({:.1f} GiB) is full, so further checkpoints stay on the GPU "
    "(which may run out of memory). Set MemoryConfig.host_memory_gib if the host has more room, or shorten the "
    "sequence; see Note [Host budget] in longseq/memory/host_budget.py."
)
_DOUBLE_CHECKPOINT = (
    "MemoryConfig.offload_checkpoints=True checkpoints every decoder layer itself, and HF gradient checkpointing "
    "is on too (it would checkpoint each layer twice). Call model.activation_checkpointing_disable() (older "
    "transformers: model.gradient_checkpointing_disable()), or set offload_checkpoints=False to keep HF's."
)


class CheckpointOffloader:
    """Per-model state: the side stream, the stats, the host budget and arena, and the chain of checkpoints of the
    forward in progress."""

    def __init__(self, state: LongseqState, config: MemoryConfig, num_layers: int):
        self.state, self.num_layers = weakref.ref(state), num_layers
        self.budget = HostBudget(config.host_memory_gib)
        self.arena: HostArena | None = None  # made at the first offload, when the budget is fixed
        self.stats = OffloadStats()
        self.configure(config)
        self.stream = None
        self.last_record = None  # weak reference to the latest checkpoint record of this forward
        self.last_attention = None  # weak reference to the last KeptAttention of this forward
        self.checkpoint_bytes = 0  # host bytes of one offloaded checkpoint, this forward
        self.saved = weakref.WeakValueDictionary()

    def configure(self, config: MemoryConfig) -> None:
        """Take `config`'s settings; between steps only, never while a forward's backward is pending (Note
        [Automatic memory] in models/auto_memory.py). A new host_memory_gib moves the budget and the arena's limit
        (the arena keeps the chunks it has: Note [Host arena])."""
        self.enabled = config.offload_checkpoints
        self.min_bytes, self.layers_per_checkpoint = config.offload_min_bytes, config.layers_per_checkpoint
        self.first_kept = self.num_layers - config.keep_last_layers_on_gpu
        on_gpu = config.keep_last_attention_on_gpu
        self.first_attention_kept = self.num_layers - (config.keep_last_layers_on_gpu if on_gpu is None else on_gpu)
        self.cache_attention = config.cache_attention
        self.prefetch_after_attention = config.prefetch_after_attention
        if self.budget.gib != config.host_memory_gib:
            self.budget.set(config.host_memory_gib)
            if self.arena is not None:
                self.stats.budget_bytes = self.arena.limit = self.budget.fix()

    def host_has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit in the host budget (Note [Host budget]); the first call fixes the budget."""
        return self._arena().has_room(nbytes)

    def host_copy(self, x: torch.Tensor) -> HostCopy | None:
        """x copied into the host arena, or None where the budget has no room for it."""
        arena = self._arena()
        runs = arena.allocate(nbytes(x))
        self.stats.arena_bytes, self.stats.arena_peak_bytes = arena.size, arena.peak_size
        return None if runs is None else HostCopy(x, runs, arena, self.stream_for(x), self.stats)

    def _arena(self) -> HostArena:
        if self.arena is None:
            self.stats.budget_bytes = self.budget.fix()
            self.arena = HostArena(self.stats.budget_bytes, pinned=torch.cuda.is_available(),
                                   chunk_bytes=host_arena.CHUNK_BYTES)
        return self.arena

    def checkpoint_bytes_after(self, index: int) -> int:
        """Host bytes the offloaded checkpoints after layer `index` will take, if sized like this forward's."""
        k = self.layers_per_checkpoint
        after = sum(1 for start in range(index + 1, self.first_kept) if start % k == 0)
        return after * self.checkpoint_bytes

    def record_of(self, index: int) -> CheckpointRecord:
        """The checkpoint record layer `index` belongs to in the forward in progress."""
        record = self.last_record() if self.last_record is not None else None
        if record is None or not record.start <= index < record.start + self.layers_per_checkpoint:
            raise RuntimeError(f"longseq: decoder layer {index} ran outside the order of its checkpoint; the "
                               "decoder layers must run once each, in order, per forward.")
        return record

    def stream_for(self, x: torch.Tensor):
        """The side stream for copies of `x` (None off CUDA)."""
        if x.device.type != "cuda":
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        return self.stream

    def should_offload(self, x: torch.Tensor) -> bool:
        """Whether a saved tensor is worth a host copy: a non-empty float tensor of offload_min_bytes or more, not a
        parameter, not saved already by an earlier layer of this forward (still alive, so shared: moving it frees
        nothing). Empty tensors never are (torch <= 2.11's checkpoint saves an empty placeholder before the layer's
        inputs: with offload_min_bytes=0 it would be taken for the layer input, Note [Checkpoint segments])."""
        if x.numel() == 0:
            return False
        shared = self.saved.get(x.untyped_storage().data_ptr()) is not None
        self.saved[x.untyped_storage().data_ptr()] = x
        return not (shared or isinstance(x, nn.Parameter) or not x.is_floating_point() or nbytes(x) < self.min_bytes)

    def offload_or_keep(self, x: torch.Tensor, offload: bool):
        """A HostCopy of x, or x itself where it stays (not to be offloaded, or the host budget is full)."""
        handle = self.host_copy(x) if offload else None
        if offload and handle is None:
            if not self.stats.checkpoints_on_device:
                warnings.warn(_HOST_FULL.format((self.stats.budget_bytes or 0) / 2**30), stacklevel=3)
            self.stats.checkpoints_on_device += 1
        if handle is not None:
            self.checkpoint_bytes = handle.size
        return x if handle is None else handle

    @torch.compiler.disable  # host bookkeeping: dynamo would replay its weak references as strong ones
    def hooks(self, index: int) -> torch.autograd.graph.saved_tensors_hooks:
        """Pack/unpack hooks for layer `index`'s checkpoint; layer 0 starts a new forward."""
        if index == 0:
            self.last_record, self.last_attention, self.saved = None, None, weakref.WeakValueDictionary()
        if self.layers_per_checkpoint > 1:
            return segment_hooks(self, index)
        record = CheckpointRecord(index, self.last_record)
        self.last_record = weakref.ref(record)
        offload = index < self.first_kept

        def pack(x: torch.Tensor):
            packed = self.offload_or_keep(x, self.should_offload(x) and offload)
            if isinstance(packed, HostCopy):
                record.copies.append(weakref.ref(packed))
            return packed

        def unpack(packed):
            x = packed.take(self.stats) if isinstance(packed, HostCopy) else packed
            if not record.prefetched_by_attention(self.prefetch_after_attention):
                record.prefetch_earlier()
            return x

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    @torch.compiler.disable  # host bookkeeping: dynamo would replay its weak references as strong ones
    def new_segment(self, index: int) -> Segment:
        """The record of the segment that layer `index` starts (Note [Checkpoint segments])."""
        stop = min(index + self.layers_per_checkpoint, self.num_layers)
        segment = Segment(self.state(), self, index, stop, self.last_record)
        self.last_record = weakref.ref(segment)
        return segment


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    if getattr(self, "gradient_checkpointing", False):
        raise RuntimeError(_DOUBLE_CHECKPOINT)
    plain = self._longseq_inner_forward
    state, index = self._longseq_offload
    offloader = state.offloader
    if not (self.training and torch.is_grad_enabled() and offloader.enabled):
        return plain(*args, **kwargs)
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    with offloader.hooks(index):
        if offloader.layers_per_checkpoint > 1:
            offloader.record_of(index).remember_call(index, self, args, kwargs)
        return checkpoint(functools.partial(plain, **kwargs), *args, use_reentrant=False,
                          context_fn=functools.partial(attention_phases, state, index))


def apply_checkpoint_offload(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Checkpoint every decoder layer and hold its saved input in host memory (Note [Checkpoint offload])."""
    layers = decoder_layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError(_DOUBLE_CHECKPOINT)
    if any(hasattr(layer, "_longseq_offload") for layer in layers):
        raise ValueError("apply_checkpoint_offload was already applied to this model; apply it once.")
    state: LongseqState = attach_state(model)
    state.offloader = CheckpointOffloader(state, config, len(layers))
    for index, layer in enumerate(layers):
        layer._longseq_offload = (state, index)
        layer._longseq_inner_forward = layer.forward  # the class's, or whatever an earlier wrapper installed
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return model


def offload_stats(model: nn.Module) -> OffloadStats:
    """Host bytes held by offloaded checkpoints now and at peak (reset with `offload_stats(model).peak_bytes = 0`),
    the host arena's size and high-water mark, and what did not fit the budget."""
    state = longseq_state(model)
    if state is None or state.offloader is None:
        raise ValueError("offload_stats: apply_checkpoint_offload(model, config) was not applied to this model.")
    return state.offloader.stats
