"""The host arena (memory/host_arena.py, Note [Host arena]): pages handed out in runs, growth in chunks up to the
budget and never past it, freed pages behind copy events, host copies through fragmented pages; and a model whose
lengths grow, shrink and repeat in one process.

    PYTHONPATH=src python -m pytest -q tests/test_host_arena.py
"""

from __future__ import annotations

import pytest
import torch

import longseq
from longseq.memory import MemoryConfig, host_arena, offload_stats
from longseq.memory.host_arena import HostArena, Run
from longseq.memory.host_copy import HostCopy, OffloadStats
from tests.models import batch, tiny_model
from tests.test_ulysses import compare

PAGE = 4096


def _arena(limit, chunk=16 * PAGE) -> HostArena:
    return HostArena(limit, pinned=False, chunk_bytes=chunk, page_bytes=PAGE)


def test_pages_come_in_runs_and_go_back_merged():
    arena = _arena(64 * PAGE)
    a, b, c = (arena.allocate(n * PAGE) for n in (4, 3, 5))
    assert (a, b, c) == ([Run(0, 0, 4)], [Run(0, 4, 3)], [Run(0, 7, 5)])
    assert arena.size == 16 * PAGE and arena.allocate(1) == [Run(0, 12, 1)]  # a partial page takes a whole one
    arena.release(b)
    assert arena.allocate(2 * PAGE) == [Run(0, 4, 2)]  # first fit, in the hole b left
    arena.release(a)
    arena.release(c)
    assert arena.free[0] == [(0, 4), (6, 6), (13, 3)]  # a and c merged with their free neighbours


def test_an_empty_tensor_takes_no_pages_even_from_a_full_arena():
    arena = _arena(16 * PAGE)
    assert arena.allocate(16 * PAGE) == [Run(0, 0, 16)]  # full, and at its limit
    assert arena.allocate(0) == []  # seen on CUDA (tests/gpu): an empty saved tensor failed in _take
    x = torch.empty(0, 3)
    copy = HostCopy(x, [], arena, None, OffloadStats())
    assert copy.take(OffloadStats()).shape == (0, 3)


def test_a_fragmented_arena_serves_a_large_copy_in_several_runs():
    arena = _arena(32 * PAGE)
    held = [arena.allocate(PAGE) for _ in range(32)]
    for runs in held[::2]:
        arena.release(runs)
    runs = arena.allocate(12 * PAGE)  # 16 single free pages, no room to grow
    assert len(runs) == 12 and {r.chunk for r in runs} == {0, 1} and arena.size == 32 * PAGE
    assert arena.allocate(5 * PAGE) is None  # 4 pages left: refused, nothing grows
    assert arena.size == arena.peak_size == 32 * PAGE


def test_growth_stops_at_the_limit_in_power_of_two_chunks():
    arena = _arena(23 * PAGE)  # chunks of 16, then 4, 2, 1 pages: 23 in all
    assert arena.has_room(23 * PAGE) and not arena.has_room(24 * PAGE)
    assert arena.allocate(20 * PAGE) is not None
    assert [c.numel() // PAGE for c in arena.chunks] == [16, 4]
    assert arena.allocate(3 * PAGE) is not None and arena.size == 23 * PAGE
    assert not arena.has_room(1) and arena.allocate(1) is None
    unbounded = _arena(None)
    assert unbounded.allocate(100 * PAGE) is not None and unbounded.size == 112 * PAGE


class _Event:
    def __init__(self):
        self.done, self.waited = False, False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = self.done = True


def test_pages_freed_behind_a_copy_wait_for_it_before_the_arena_grows():
    arena = _arena(16 * PAGE)
    runs = arena.allocate(16 * PAGE)
    event = _Event()
    arena.release(runs, event)
    assert arena.has_room(16 * PAGE)
    assert arena.allocate(8 * PAGE) is not None  # no room without them: the allocation waited for the copy
    assert event.waited and arena.size == 16 * PAGE
    other, later = _Event(), _Event()
    arena.release(arena.allocate(8 * PAGE), other)
    other.done = True  # finished on its own: reclaimed without waiting
    arena.release(arena.allocate(8 * PAGE), later)
    assert not later.waited


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_copy_round_trip_through_scattered_pages(dtype):
    """A (B, S, H, D)-ordered tensor seen as (B, H, S, D), copied into scattered pages and back: same values, same
    layout; its pages return to the arena when the copy is gone."""
    arena = _arena(16 * PAGE)
    held = [arena.allocate(PAGE) for _ in range(16)]
    for runs in held[1::2]:
        arena.release(runs)
    x = torch.randn(2, 37, 4, 16).to(dtype).transpose(1, 2)
    stats = OffloadStats()
    copy = HostCopy(x, arena.allocate(x.numel() * x.element_size()), arena, None, stats)
    assert len(copy.runs) > 1 and stats.current_bytes == x.numel() * x.element_size()
    back = copy.take(stats)
    assert back.stride() == x.stride() and torch.equal(back, x)
    assert torch.equal(copy.take(stats), x)  # a later take brings it back again
    free = arena._ready()
    del copy
    assert stats.current_bytes == 0 and arena._ready() > free


def test_lengths_that_grow_shrink_and_repeat_never_grow_the_arena_past_the_budget(monkeypatch):
    """One model, lengths 64 → 128 → 256 → 128 → 256 with checkpoints and kept attention outputs: the arena never
    holds more than the budget, serves the live bytes, and repeating a length adds nothing to it."""
    monkeypatch.setattr(host_arena, "CHUNK_BYTES", 64 * PAGE)
    budget = 3 << 20
    memory = MemoryConfig(host_memory_gib=budget / 2**30, tile_tokens=32, offload_min_bytes=0,
                          expandable_segments=False)
    mesh = longseq.Mesh()
    model = longseq.apply(tiny_model(num_hidden_layers=3), mesh, memory)
    stats, sizes = offload_stats(model), {}
    for length in (64, 128, 256, 128, 256):
        stats.peak_bytes = 0
        longseq.causal_lm_loss(model, longseq.shard_batch(batch(length, rows=2), mesh), mesh).backward()
        assert stats.peak_bytes <= stats.arena_bytes <= stats.arena_peak_bytes <= stats.budget_bytes == budget
        assert stats.current_bytes == 0 and stats.attention_not_kept == stats.checkpoints_on_device == 0
        sizes.setdefault(length, []).append(stats.arena_bytes)
    assert sizes[256][0] == sizes[256][1] == stats.arena_peak_bytes and sizes[128][1] == sizes[256][0]
    assert sizes[64][0] < sizes[256][0]
    compare(tiny_model(num_hidden_layers=3), batch(200, rows=2), mesh, memory=memory)
