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
exactness is tested. The host copies are host_copy.py's; how many bytes they may take is Note [Host budget]
(host_budget.py); beside each checkpoint the layer's attention outputs may be kept (Note [Attention output cache],
attention_cache.py).
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
from longseq.memory.config import MemoryConfig
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
    """Per-model state: the side stream, the stats, the host budget, and the chain of handles of the forward in
    progress."""

    def __init__(self, config: MemoryConfig, num_layers: int):
        self.min_bytes = config.offload_min_bytes
        self.first_kept = num_layers - config.keep_last_layers_on_gpu
        self.cache_attention = config.cache_attention
        self.budget = HostBudget(config.host_memory_gib)
        self.layer_bytes: dict[int, int] = {}  # checkpoint bytes offloaded per layer, this forward
        self.stats = OffloadStats()
        self.stream = None
        self.last = None  # weak reference to the last HostCopy of this forward's checkpoints
        self.last_attention = None  # weak reference to the last KeptAttention of this forward
        self.saved = weakref.WeakValueDictionary()

    def host_has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit in the host budget (Note [Host budget]); the first call fixes the budget."""
        room = self.budget.has_room(self.stats.current_bytes, nbytes)
        self.stats.budget_bytes = self.budget.limit
        return room

    def checkpoint_bytes_after(self, index: int) -> int:
        """Host bytes the checkpoints of the offloaded layers after `index` will take, if sized like layer index's."""
        return max(0, self.first_kept - index - 1) * self.layer_bytes.get(index, 0)

    def stream_for(self, x: torch.Tensor):
        """The side stream for copies of `x` (None off CUDA)."""
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
            or nbytes(x) < self.min_bytes
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
            if move and not self.host_has_room(nbytes(x)):
                if not self.stats.checkpoints_on_device:
                    warnings.warn(_HOST_FULL.format(self.stats.budget_bytes / 2**30), stacklevel=2)
                self.stats.checkpoints_on_device += 1
                move = False
            if not move:
                return x
            self.layer_bytes[index] = self.layer_bytes.get(index, 0) + nbytes(x)
            handle = HostCopy(x, self.stream_for(x), self.stats)
            self.last = weakref.ref(handle)
            return handle

        def unpack(packed):
            x = packed.take(self.stats) if isinstance(packed, HostCopy) else packed
            earlier = previous() if previous is not None else None
            if earlier is not None:
                earlier.prefetch()
            return x

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


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
    state, index = self._longseq_offload
    with state.offloader.hooks(index):
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
    state.offloader = CheckpointOffloader(config, len(layers))
    for index, layer in enumerate(layers):
        layer._longseq_offload = (state, index)
        layer._longseq_inner_forward = layer.forward  # the class's, or whatever an earlier wrapper installed
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return model


def offload_stats(model: nn.Module) -> OffloadStats:
    """Host bytes held by offloaded checkpoints now and at peak (reset with `offload_stats(model).peak_bytes = 0`)."""
    state = longseq_state(model)
    if state is None or state.offloader is None:
        raise ValueError("offload_stats: apply_checkpoint_offload(model, config) was not applied to this model.")
    return state.offloader.stats
