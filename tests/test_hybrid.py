"""Ring and Ulysses × ring inside the full transformers model, and the memory features composed with sp, against the
unsharded, untiled model."""

from __future__ import annotations

import pytest
import torch

import longseq
from longseq.state import longseq_state
from tests.distributed import run_distributed
from tests.models import assert_grads_equal, batch, tiny_model
from tests.test_ulysses import compare

CASES = [
    dict(length=127),                                        # odd: padded to a multiple of 2·ring·ulysses
    dict(length=130, rows=2, documents=[1, 50, 33, 46]),     # packed, different per row, documents crossing ranks
]


def _layouts(sp: int, ring: int, overrides: dict):
    mesh = longseq.init_mesh(sp=sp, ring=ring)
    assert (mesh.ulysses, mesh.ring) == (sp // ring, ring)
    for case in CASES:
        compare(tiny_model("llama", **overrides), batch(**case), mesh)
    compare(tiny_model("qwen3", num_key_value_heads=1), batch(**CASES[1]), mesh)


@pytest.mark.parametrize("sp,ring", [(2, 2), (4, 4), (4, 2)])
def test_ring_and_hybrid(sp, ring):
    run_distributed(_layouts, sp, sp, ring, {})


def _automatic_split():
    """Heads that do not divide sp: init_mesh(model=...) puts the rest into the ring, and the model just works."""
    model = tiny_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    mesh = longseq.init_mesh(sp=4, model=model)
    assert (mesh.ulysses, mesh.ring) == (2, 2)
    compare(model, batch(96, rows=2), mesh)


def test_automatic_split():
    run_distributed(_automatic_split, 4)


def _memory_with_sp(ring: int):
    mesh = longseq.init_mesh(sp=2, ring=ring)
    memory = longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0)
    for family in ("llama", "gemma3") if ring == 1 else ("llama",):
        compare(tiny_model(family, tie_word_embeddings=family == "gemma3"), batch(**CASES[1]), mesh, memory=memory)


@pytest.mark.parametrize("ring", [1, 2])
def test_memory_features_with_sp(ring):
    run_distributed(_memory_with_sp, 2, ring)


def _sliding_windows(sp: int, ring: int):
    """Sliding-window layers on ring blocks (Note [Sliding windows on blocks]): windows shorter than a chunk."""
    mesh = longseq.init_mesh(sp=sp, ring=ring)
    for family in ("mistral", "gemma3"):
        compare(tiny_model(family, sliding_window=12), batch(**CASES[1]), mesh)


@pytest.mark.parametrize("sp,ring", [(2, 2), (4, 2)])
def test_ring_sliding_windows(sp, ring):
    run_distributed(_sliding_windows, sp, sp, ring)


def _ring_extras():
    """Note [Document placement] in the loss path: per-token loss weights move with their tokens; a forward of other
    position_ids (the logits path, zigzag) between a loss forward and its backward leaves the backward's
    recompute the placed documents. Loss and gradients equal one process's."""
    mesh = longseq.init_mesh(sp=2, ring=2)
    memory = longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0)
    data = batch(**CASES[1])
    data["shift_loss_weights"] = torch.rand(data["input_ids"].shape, generator=torch.Generator().manual_seed(2))
    single = longseq.apply(tiny_model("llama"), longseq.Mesh(), memory)
    want = longseq.causal_lm_loss(single, longseq.shard_batch(data, longseq.Mesh()))
    want.backward()
    model = longseq.apply(tiny_model("llama"), mesh, memory)
    local = longseq.shard_batch(data, mesh)
    got = longseq.causal_lm_loss(model, local, mesh)
    assert longseq_state(model).documents._placed[3] is not None  # the rows moved
    with torch.no_grad():
        model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)
    got.backward()
    longseq.sync_gradients(model, mesh)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_grads_equal(single, model)
    # Ranks holding different numbers of tokens: the document placement raises on every rank, none hangs.
    length = 8 + 2 * mesh.rank
    local = {"input_ids": torch.zeros(1, length, dtype=torch.long), "shift_labels": torch.zeros(1, length).long(),
             "position_ids": torch.arange(length)[None] + 100 * mesh.rank}
    with pytest.raises(ValueError, match="different numbers of tokens"):
        longseq.causal_lm_loss(longseq.apply(tiny_model("llama"), mesh), local, mesh)


def test_ring_loss_weights_and_errors():
    run_distributed(_ring_extras, 2)


def test_ring_layout_errors():
    with pytest.raises(ValueError, match="ring=3 must divide sp=4"):
        longseq.mesh._resolve_split(4, 3, None)
    with pytest.raises(ValueError, match="at least 8 tokens"):
        longseq.shard_batch(batch(7), longseq.Mesh(world_size=4, sp=4, ulysses=2, ring=2))
    with pytest.raises(ValueError, match="Ring attention runs on PyTorch's SDPA"):
        longseq.apply(tiny_model("llama"), longseq.Mesh(world_size=2, sp=2, ring=2), attention="flash_attention_2")
