"""The host budget (memory/host_budget.py): what the offloader may hold on the host, and what it does beyond it.

    PYTHONPATH=src python -m pytest -q tests/test_host_budget.py
"""

from __future__ import annotations

import warnings

import pytest

import longseq
from longseq.memory import MemoryConfig, host_budget, offload_stats, reserve_host_memory
from longseq.memory.host_arena import PAGE_BYTES
from tests.models import batch, tiny_model
from tests.test_attention_cache import LAYERS, _step_counting_kernel_calls
from tests.test_ulysses import compare


def _checkpoint_bytes(data, mesh) -> int:
    """Host bytes of one layer's offloaded checkpoint for `data` (measured without the cache)."""
    memory = MemoryConfig(cache_attention=False, tile_tokens=32, offload_min_bytes=0, expandable_segments=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
    return offload_stats(model).peak_bytes // LAYERS


@pytest.mark.parametrize("checkpoints_that_fit", [LAYERS, 1.5])
def test_host_budget_drops_attention_outputs_then_keeps_checkpoints_on_device(checkpoints_that_fit, monkeypatch):
    """Past MemoryConfig.host_memory_gib, attention outputs are not kept first (room is left for the checkpoints
    still to come), then checkpoints stay on the device; the host never holds more than the budget, and results
    stay exact."""
    mesh, data = longseq.Mesh(), batch(96, rows=2, documents=[40, 56])
    per_layer = _checkpoint_bytes(data, mesh)
    budget = int(checkpoints_that_fit * per_layer)
    memory = MemoryConfig(host_memory_gib=budget / 2**30, tile_tokens=32, offload_min_bytes=0,
                          expandable_segments=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward, backward = _step_counting_kernel_calls(model, data, mesh, monkeypatch)
    full = [w for w in caught if "host budget" in str(w.message)]
    on_host = int(checkpoints_that_fit)
    assert len(full) == (on_host < LAYERS)  # warned once, and only when checkpoints stay on the device
    stats = offload_stats(model)
    assert backward == forward  # every attention recomputed: no pair fit beside the checkpoints
    assert stats.attention_not_kept == LAYERS
    assert stats.checkpoints_on_device == LAYERS - on_host
    assert stats.peak_bytes == on_host * per_layer <= budget == stats.budget_bytes
    compare(tiny_model(num_hidden_layers=LAYERS), data, mesh, memory=memory)


def test_host_budget_keeps_attention_outputs_it_has_room_for(monkeypatch):
    """A budget with room for every checkpoint and one (out, lse) pair keeps exactly one pair: the first layer's."""
    mesh, data = longseq.Mesh(), batch(96, rows=2, documents=[40, 56])
    per_layer = _checkpoint_bytes(data, mesh)
    lse = 2 * 96 * tiny_model().config.num_attention_heads * 4  # fp32 (B, heads, S)
    pair = per_layer + lse  # the output has the input's size
    paged = (LAYERS + 1) * _paged(per_layer) + _paged(lse)  # the host arena hands out whole pages
    memory = MemoryConfig(host_memory_gib=paged / 2**30, tile_tokens=32, offload_min_bytes=0,
                          expandable_segments=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    forward, backward = _step_counting_kernel_calls(model, data, mesh, monkeypatch)
    stats = offload_stats(model)
    assert (stats.attention_not_kept, stats.checkpoints_on_device) == (LAYERS - 1, 0)
    assert backward == forward // LAYERS * (LAYERS - 1)
    assert stats.peak_bytes == LAYERS * per_layer + pair
    assert stats.arena_peak_bytes <= stats.budget_bytes == paged


def _paged(nbytes: int) -> int:
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


def test_automatic_host_budget(monkeypatch):
    """Without host_memory_gib: this process's share of 90% of the host, less its resident memory and what
    reserve_host_memory was told; fixed at the first offload, after which a reservation is refused."""
    monkeypatch.setattr(host_budget, "_host_total", lambda: 100 << 30)
    monkeypatch.setattr(host_budget, "_resident_bytes", lambda: 10 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    mesh, data = longseq.Mesh(), batch(64, rows=1, documents=[64])
    memory = MemoryConfig(offload_min_bytes=0, expandable_segments=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    reserve_host_memory(model, 4 << 30)
    reserve_host_memory(model, 1 << 30)
    longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh).backward()
    assert offload_stats(model).budget_bytes == int(0.9 * (100 << 30)) // 2 - (10 << 30) - (5 << 30)
    with pytest.raises(RuntimeError, match="before the model's first forward"):
        reserve_host_memory(model, 1)
    monkeypatch.setattr(host_budget, "_host_total", lambda: None)  # no /proc/meminfo: no automatic limit
    assert host_budget._automatic_budget(0) is None
