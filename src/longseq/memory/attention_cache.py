"""Attention outputs kept from a checkpointed layer's forward for its recompute in backward.

Note [Attention output cache]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Recomputing a layer in backward repeats its attention forward: at long lengths, where attention dominates, that is
about 1/4.5 of all attention work (forward 1, backward 2.5, recompute 1), and with a ring, R − 1 more K/V exchanges.
The attention's backward needs only its inputs (recomputed anyway), its output and log-sum-exp. So each checkpointed
layer call gets a compute-or-replay function `cache(compute) -> (out, lse)`:

    layer forward:    compute() → (out, lse); both are kept like the checkpoint itself (host copies; those of the
                      last MemoryConfig.keep_last_attention_on_gpu layers on the GPU), in a list that belongs to this
                      one checkpoint call
    layer recompute:  (out, lse) are taken from that list instead of calling compute(); their host→GPU copy starts
                      when the recompute begins (with MemoryConfig.prefetch_after_attention=False also the next,
                      earlier layer's then)
    attention backward done: a hook on q's gradient calls the cache's backward_done() (ring_attention); with
                      prefetch_after_attention, the checkpoint the next layer's recompute needs starts coming back then
                      (not earlier: at the attention backward, the step's peak, it would add one layer input)

How it reaches the attention, explicitly at each step:

    checkpoint wrapper (checkpoint_offload.py)   context_fn → the layer call's two phases (forward, recompute);
                                                 entering one sets LongseqState.attention_cache to it
    attention function (parallel/attention.py)   reads state.attention_cache, passes it to the block kernels
    ring_attention(..., cache=) (parallel/ring)  its forward returns cache(compute) instead of compute()

`torch.utils.checkpoint`'s context_fn enters one context around the forward and another around the recompute,
which is how the two are told apart; the list belongs to one checkpoint call, so any number of forwards may be in
flight. Only longseq's block kernels return the log-sum-exp, so only they use the cache (R ≥ 1; on one GPU for SDPA
layers, see parallel/attention.py). Host memory: the output has the size of the layer's input (for Llama,
heads · head_dim = hidden), so the checkpoints' host memory doubles. A pair is kept only where the host budget
(Note [Host budget]) has room for it and for the checkpoints of the layers still to come; the others are recomputed
(`OffloadStats.attention_not_kept` counts them). MemoryConfig.cache_attention=False turns it off.

Note [Kept pairs hold no graph]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A pair kept on the GPU is stored, and replayed, as a fresh alias of the forward's tensors (`detach()`: the same
memory, no autograd history). Were the attention function's own output object kept and returned again, autograd
would give it the attention node as grad_fn, whose graph the pair would then keep alive: before q's hook
(backward_done) held the cache weakly (parallel/ring.py), that graph reached this phase, its KeptAttention and so the
pair again, a cycle through autograd's C++ nodes, which Python's garbage collector cannot see. Each step then leaked, per layer keeping its output on the GPU, that output with the recompute's input
norm, q, k and v (52 KiB per token for the 8B shape with untiled norms); device call 26 ran out of memory at 128K
on its second step from it. tests/test_attention_cache.py checks that nothing outlives a step.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from longseq.memory.host_copy import HostCopy, nbytes
from longseq.state import LongseqState


class KeptAttention:
    """The attention (out, lse) pairs of one checkpointed layer call, kept from its forward for its recompute.

    offloader: the model's CheckpointOffloader; record: the checkpoint this layer's input belongs to (its own, or its
    segment's: Note [Checkpoint segments]); earlier: a weak reference to the previous layer's KeptAttention of the
    same forward.
    """

    def __init__(self, offloader, index: int, record, earlier):
        self.offloader, self.index, self.earlier = offloader, index, earlier
        self.record = weakref.ref(record)  # the record keeps this object: a strong reference back would be a cycle
        self.offload = index < offloader.first_attention_kept
        self.pairs: list[list | None] = []
        self.replayed = 0  # pairs taken by the recompute in progress (a retained graph may recompute again)

    def keep(self, tensors: tuple[torch.Tensor, ...]) -> None:
        offloader = self.offloader
        move = [self.offload and nbytes(t) >= offloader.min_bytes for t in tensors]
        moved = sum(nbytes(t) for t, m in zip(tensors, move) if m)
        if moved and not offloader.host_has_room(moved + offloader.checkpoint_bytes_after(self.index)):
            offloader.stats.attention_not_kept += 1
            self.pairs.append(None)  # the recompute computes this one
            return
        # A pair kept on the GPU is held as an alias without autograd history (Note [Kept pairs hold no graph]).
        self.pairs.append([offloader.host_copy(t) if m else t.detach() for t, m in zip(tensors, move)])

    def prefetch(self) -> None:
        for pair in filter(None, self.pairs):
            for handle in pair:
                if isinstance(handle, HostCopy):
                    handle.prefetch()

    def take(self) -> tuple[torch.Tensor, ...] | None:
        """The next kept pair, or None where the forward could not keep it."""
        if self.replayed == len(self.pairs):
            raise RuntimeError("longseq: a layer's recompute called attention more often than its forward did.")
        pair = self.pairs[self.replayed]
        self.replayed += 1
        if pair is None:
            return None
        return tuple(h.take(self.offloader.stats) if isinstance(h, HostCopy) else h.detach() for h in pair)

    def backward_done(self) -> None:
        """This layer's attention backward ran: the first layer of a checkpoint starts bringing back the one before
        (MemoryConfig.prefetch_after_attention; Note [Checkpoint offload])."""
        record = self.record()
        if self.offloader.prefetch_after_attention and record is not None and self.index == record.start:
            record.prefetch_earlier()


class AttentionPhase:
    """A checkpointed layer call's forward or its recompute: as a context it publishes itself as the model's
    attention cache (LongseqState.attention_cache); called as `phase(compute)` it keeps or replays (out, lse).
    Reusable, as a retained graph recomputes again. look_back: entering a replay also prefetches the earlier layer's
    pairs (MemoryConfig.prefetch_after_attention=False)."""

    def __init__(self, state: LongseqState, kept: KeptAttention, replay: bool, look_back: bool = False):
        self.state, self.kept, self.replay, self.look_back, self.prior = state, kept, replay, look_back, None

    def __enter__(self):
        if self.replay:
            self.kept.replayed = 0
            self.kept.prefetch()
            earlier = self.kept.earlier() if self.look_back and self.kept.earlier is not None else None
            if earlier is not None:
                earlier.prefetch()
        self.prior = self.state.attention_cache
        self.state.attention_cache = self

    def __exit__(self, *exc):
        self.state.attention_cache = self.prior

    def __call__(self, compute):
        """`compute() -> (out, lse)`: run and kept in the forward, replayed in the recompute (computed again where
        the forward could not keep it)."""
        if self.replay:
            pair = self.kept.take()
            return pair if pair is not None else compute()
        result = compute()
        self.kept.keep(result)
        return result

    @property
    def backward_done(self):
        """What to call once backward is past this layer's attention (ring_attention hooks q's gradient; backward runs
        the nodes of the layer's forward, so it is the forward phase's hook that fires): the kept pairs' method, as
        the hook holds it weakly. The pairs live as long as the checkpoint that replays them (its record and
        recompute phase), so after a backward without retain_graph they go with it, even while the loss (and with
        it the hook on q's node) is still alive."""
        return self.kept.backward_done


@torch.compiler.disable  # host bookkeeping: dynamo would replay its weak references as strong ones
def attention_phases(state: LongseqState, index: int):
    """checkpoint's context_fn for layer `index` of the model whose state is `state`: the (forward, recompute)
    contexts that keep attention outputs and replay them (Note [Attention output cache])."""
    offloader = state.offloader
    if not offloader.cache_attention:
        return contextlib.nullcontext(), contextlib.nullcontext()
    kept = KeptAttention(offloader, index, offloader.record_of(index), offloader.last_attention)
    offloader.last_attention = weakref.ref(kept)
    offloader.record_of(index).kept[index] = kept
    look_back = not offloader.prefetch_after_attention
    return AttentionPhase(state, kept, replay=False), AttentionPhase(state, kept, replay=True, look_back=look_back)
