"""Checkpoint records: one per checkpoint of a forward, a layer's or a segment of layers' (one input per k layers).

Note [Checkpoint segments]
~~~~~~~~~~~~~~~~~~~~~~~~~~
With MemoryConfig.layers_per_checkpoint = k, one input per k consecutive layers is kept (offloaded as in Note
[Checkpoint offload]), not one per layer: the checkpoints' host bytes drop k-fold. Every layer is still checkpointed
on its own, so backward still holds one layer's activations at a time; only the inputs of a segment's later layers
are not kept but rebuilt when backward first needs one:

    forward    layer s       saves x_s      ──pack──> host copy (kept by the segment) + a placeholder
               layer s+1..e  save x_j       ──pack──> a placeholder; x_j is freed with the forward
    backward   layer e needs x_e: the segment brings x_s back and runs layers s .. e−1 forward without autograd
               (attention replayed from the cache where its outputs were kept), keeping x_s .. x_e on the GPU;
               layers e−1 .. s then take theirs from there, each input going once its layer has it

So the GPU holds at most k layer inputs while a segment is in backward, and the cost is one more forward of k − 1
layers per segment, without attention where its outputs were kept (Note [Attention output cache]). The rebuild runs
each layer with the arguments and RNG state it had in forward. It is nested checkpointing without nesting torch's
checkpoint: every layer's own checkpoint is unchanged, only where its saved input comes from differs.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from longseq.memory.attention_cache import AttentionPhase
from longseq.memory.host_copy import HostCopy


class CheckpointRecord:
    """One checkpoint of a forward (a layer's, or a segment's): its host copies, the attention kept by its layers,
    and a weak reference to the checkpoint before it."""

    def __init__(self, start: int, earlier):
        self.start, self.earlier = start, earlier
        self.copies: list[weakref.ref] = []
        self.kept: dict = {}  # layer index -> KeptAttention

    def prefetch(self) -> None:
        for ref in self.copies:
            copy = ref()
            if copy is not None:
                copy.prefetch()

    def prefetch_earlier(self) -> None:
        earlier = self.earlier() if self.earlier is not None else None
        if earlier is not None:
            earlier.prefetch()

    def prefetched_by_attention(self, prefetch_after_attention: bool) -> bool:
        """Whether the earlier checkpoint's prefetch is started by this one's first layer's attention backward
        (which runs only where that layer's attention went through the cache)."""
        kept = self.kept.get(self.start)
        return prefetch_after_attention and kept is not None and bool(kept.pairs)


class SegmentInput:
    """What a segment layer's checkpoint saves in place of its input."""

    def __init__(self, segment: Segment, index: int):
        self.segment, self.index = segment, index


class Segment(CheckpointRecord):
    """Layers [start, stop) of one forward, checkpointed through the input of `start` (Note [Checkpoint segments])."""

    def __init__(self, state, offloader, start: int, stop: int, earlier):
        super().__init__(start, earlier)
        self.state, self.offloader, self.stop = state, offloader, stop
        self.first = None  # the packed input of layer `start`: a HostCopy, or the tensor where it stays
        self.calls: dict[int, tuple] = {}  # layer index -> (layer, args after the input, kwargs, RNG states)
        self.inputs: dict[int, torch.Tensor] = {}  # layer index -> its rebuilt input, until its layer takes it

    def remember_call(self, index: int, layer, args: tuple, kwargs: dict) -> None:
        """How layer `index` was called in forward, for the rebuild (its first positional argument is its input).
        The rebuild calls the module itself, so hooks around its forward run as in forward (FSDP2 gathers its
        parameters, which are sharded again while a later layer is in backward)."""
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        self.calls[index] = (layer, args[1:], kwargs, rng)

    def take(self, index: int) -> torch.Tensor:
        """Layer `index`'s input on the device, rebuilt from the segment's input where not already there."""
        if index not in self.inputs:
            self._rebuild(index)
        x = self.inputs.pop(index)
        if index == self.start and not self.prefetched_by_attention(self.offloader.prefetch_after_attention):
            self.prefetch_earlier()
        return x

    def _rebuild(self, upto: int) -> None:
        first = self.first
        x = first.take(self.offloader.stats) if isinstance(first, HostCopy) else first
        self.inputs[self.start] = x
        for index in range(self.start, upto):
            x = self._run(index, x)
            self.inputs[index + 1] = x

    def _run(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s forward again, without autograd, its attention replayed where kept."""
        layer, args, kwargs, rng = self.calls[index]
        kept, following = self.kept.get(index), self.kept.get(index + 1)
        if following is not None:
            following.prefetch()  # the next layer of the rebuild replays it next
        phase = AttentionPhase(self.state, kept, replay=True) if kept is not None else contextlib.nullcontext()
        with torch.no_grad(), _rng_as_in_forward(rng, x.device), phase:
            out = layer(x, *args, **kwargs)  # without autograd, longseq's layer wrapper runs the plain forward
        self.offloader.stats.layer_forwards_recomputed += 1
        return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _rng_as_in_forward(rng, device: torch.device):
    cpu_state, device_state = rng
    with torch.random.fork_rng(devices=[device] if device_state is not None else []):
        torch.set_rng_state(cpu_state)
        if device_state is not None:
            torch.cuda.set_rng_state(device_state, device)
        yield


def segment_hooks(offloader, index: int) -> torch.autograd.graph.saved_tensors_hooks:
    """Pack/unpack hooks for the checkpoint of layer `index` inside its segment: the layer's input (the first tensor
    its checkpoint saves that should_offload accepts, so never torch 2.11's empty placeholder) becomes a placeholder,
    the segment's first layer's also offloaded; empty, small, integer, parameter and shared tensors and any further
    inputs stay as they are."""
    k = offloader.layers_per_checkpoint
    segment = offloader.new_segment(index) if index % k == 0 else offloader.record_of(index)
    offload, placed = segment.start < offloader.first_kept, []

    def pack(x: torch.Tensor):
        if placed or not offloader.should_offload(x):
            return x
        placed.append(True)
        if index == segment.start:
            segment.first = offloader.offload_or_keep(x, offload)
            if isinstance(segment.first, HostCopy):
                segment.copies.append(weakref.ref(segment.first))
        return SegmentInput(segment, index)

    def unpack(packed):
        return packed.segment.take(packed.index) if isinstance(packed, SegmentInput) else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
