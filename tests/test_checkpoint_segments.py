"""One offloaded checkpoint per k layers (MemoryConfig.layers_per_checkpoint, Note [Checkpoint segments]), where the
attention outputs and checkpoints stay (keep_last_*_on_gpu), and when checkpoints come back (prefetch_after_attention):
loss and every gradient equal the plain model's, alone and with sp=2 Ulysses and ring.

    PYTHONPATH=src python -m pytest -q tests/test_checkpoint_segments.py
"""

from __future__ import annotations

import weakref

import pytest
import torch

import longseq
from longseq.memory import MemoryConfig, offload_stats
from longseq.memory.checkpoint_segments import Segment
from longseq.memory.host_copy import HostCopy
from longseq.parallel import varlen
from tests.distributed import run_distributed
from tests.models import batch, tiny_model
from tests.test_attention_cache import _step_counting_kernel_calls
from tests.test_ulysses import compare

LAYERS, B, S, H, HEADS = 5, 2, 130, 64, 4
DATA = dict(length=S, rows=B, documents=[1, 50, 33, 46])
INPUT = B * S * H * 4  # one layer input, fp32
PAIR = INPUT + B * HEADS * S * 4  # an attention output (the input's size) and its fp32 log-sum-exp


def _memory(**fields) -> MemoryConfig:
    return MemoryConfig(tile_tokens=32, offload_min_bytes=0, expandable_segments=False, **fields)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_segments_exact_with_k_fold_fewer_checkpoints(k, cache, monkeypatch):
    """5 layers, k = 1, 2, 3: ceil(5 / k) checkpoints on the host; backward rebuilds the other inputs by running
    5 − ceil(5 / k) layer forwards again, replaying kept attention (no attention kernel in backward with the cache)."""
    mesh, data = longseq.Mesh(), batch(**DATA)
    memory = _memory(layers_per_checkpoint=k, cache_attention=cache)
    checkpoints = -(-LAYERS // k)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    forward, backward = _step_counting_kernel_calls(model, data, mesh, monkeypatch)
    stats = offload_stats(model)
    assert stats.peak_bytes == checkpoints * INPUT + (LAYERS * PAIR if cache else 0)
    assert stats.layer_forwards_recomputed == LAYERS - checkpoints and stats.current_bytes == 0
    per_layer = forward // LAYERS
    assert backward == (0 if cache else forward + per_layer * (LAYERS - checkpoints))
    compare(tiny_model(num_hidden_layers=LAYERS), data, mesh, memory=memory)


def test_a_segment_holds_at_most_k_inputs_on_the_device(monkeypatch):
    """Each segment rebuilds once per backward, and its layers' inputs go as their layers take them."""
    held, rebuilds = [], []
    real_take, real_rebuild = Segment.take, Segment._rebuild
    monkeypatch.setattr(Segment, "take", lambda self, i: (real_take(self, i), held.append(len(self.inputs)))[0])
    monkeypatch.setattr(Segment, "_rebuild", lambda self, upto: rebuilds.append(upto) or real_rebuild(self, upto))
    mesh = longseq.Mesh()
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, _memory(layers_per_checkpoint=3))
    longseq.causal_lm_loss(model, longseq.shard_batch(batch(**DATA), mesh), mesh).backward()
    assert rebuilds == [4, 2]  # segments [3, 5) and [0, 3): the last layer of each needs its input first
    assert held == [1, 0, 2, 1, 0]  # inputs left on the device after layers 4, 3, then 2, 1, 0 took theirs


@pytest.mark.parametrize("keep,k,on_host", [(2, 2, 2), (1, 1, 4)])
def test_checkpoints_of_the_last_layers_stay_on_the_device(keep, k, on_host):
    """keep_last_layers_on_gpu: with segments, those starting in the last `keep` layers stay (5 layers, k=2: the
    segments start at 0, 2, 4; keep=2 keeps the one at 4)."""
    mesh = longseq.Mesh()
    memory = _memory(layers_per_checkpoint=k, cache_attention=False, keep_last_layers_on_gpu=keep)
    model = tiny_model(num_hidden_layers=LAYERS)
    compare(model, batch(**DATA), mesh, memory=memory)
    assert offload_stats(model).peak_bytes == on_host * INPUT


def test_attention_outputs_of_the_last_layers_stay_on_the_device():
    """keep_last_attention_on_gpu=2 keeps the pairs of the last 2 layers on the GPU, every checkpoint on the host."""
    mesh = longseq.Mesh()
    model = tiny_model(num_hidden_layers=LAYERS)
    compare(model, batch(**DATA), mesh, memory=_memory(keep_last_attention_on_gpu=2))
    assert offload_stats(model).peak_bytes == LAYERS * INPUT + (LAYERS - 2) * PAIR


@pytest.mark.parametrize("after_attention", [True, False])
def test_when_the_earlier_checkpoint_comes_back(after_attention, monkeypatch):
    """prefetch_after_attention: during a layer's attention backward the earlier layer's checkpoint is not on the
    device yet; without it, it is (brought back one layer ahead). Results are exact either way."""
    copies, restored_at_attention = [], []
    real_init, real_backward = HostCopy.__init__, varlen.block_backward

    def init(self, x, *args):
        real_init(self, x, *args)
        copies.append(weakref.ref(self))

    def backward(*args, **kwargs):
        checkpoints = [c() for c in copies if c() is not None and len(c().shape) == 3 and c().shape[-1] == H]
        restored_at_attention.append(sum(c.restored is not None for c in checkpoints))
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(HostCopy, "__init__", init)
    monkeypatch.setattr(varlen, "block_backward", backward)
    model = tiny_model(num_hidden_layers=3)
    memory = _memory(prefetch_after_attention=after_attention)
    compare(model, batch(**DATA), longseq.Mesh(), memory=memory)
    assert max(restored_at_attention) == (0 if after_attention else 1)  # one layer ahead: the earlier one's
    assert offload_stats(model).prefetch_hits == offload_stats(model).offloaded_tensors - 1


def _save_an_empty_tensor_first(monkeypatch) -> None:
    """Make torch's checkpoint save an empty float tensor before a layer's inputs, as torch 2.11's does (its
    _NoopSaveInputs saves torch.empty((0,), requires_grad=True) first, which the GPU machines run); newer torch
    saves the inputs alone."""
    if hasattr(torch.utils.checkpoint, "_NoopSaveInputs"):
        return  # this torch does it itself
    frame = torch.utils.checkpoint._CheckpointFrame
    save, get = frame.save_inputs, frame.get_inputs
    monkeypatch.setattr(frame, "save_inputs", lambda self, *args: save(self, torch.empty(0, requires_grad=True), *args))
    monkeypatch.setattr(frame, "get_inputs", lambda self: get(self)[1:])


@pytest.mark.parametrize("k", [1, 2])
def test_an_empty_tensor_saved_before_the_input_is_not_taken_for_it(k, monkeypatch):
    """With offload_min_bytes=0 every saved float tensor is big enough; an empty one saved before the layer input
    (torch 2.11's checkpoint) is not offloaded, nor taken for the input a segment rebuilds its later layers from."""
    _save_an_empty_tensor_first(monkeypatch)
    model = tiny_model(num_hidden_layers=LAYERS)
    memory = _memory(layers_per_checkpoint=k, attention_heads_per_call=1)
    compare(model, batch(**DATA), longseq.Mesh(), memory=memory)
    stats = offload_stats(model)
    assert stats.offloaded_tensors == -(-LAYERS // k) + LAYERS * 2  # the checkpoints and the kept pairs, no more
    assert stats.layer_forwards_recomputed == LAYERS - -(-LAYERS // k) and stats.current_bytes == 0


def _segments_with_sp(ring: int):
    mesh = longseq.init_mesh(sp=2, ring=ring)
    for k in (2, 3):
        memory = _memory(layers_per_checkpoint=k, attention_heads_per_call=1)
        model = tiny_model(num_hidden_layers=LAYERS)
        compare(model, batch(**DATA), mesh, memory=memory)
        assert offload_stats(model).layer_forwards_recomputed == LAYERS - -(-LAYERS // k)


@pytest.mark.parametrize("ring", [1, 2])
def test_segments_with_sp(ring):
    """sp=2 Ulysses (ring=1) and ring (ring=2), k = 2 and 3 over 5 layers, one head per kernel call."""
    run_distributed(_segments_with_sp, 2, ring)
