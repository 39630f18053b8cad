"""Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5, OLMo-Hybrid) under sequence parallelism, against the unsharded
transformers model: loss, logits and every gradient; Ulysses over heads, state passing, and both with a ring."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import longseq
from longseq.parallel import delta_rule, linear_attention
from longseq.parallel.documents import document_boundaries
from tests.distributed import run_distributed
from tests.models import HYBRIDS, batch, tiny_model
from tests.test_ulysses import TOL, sharded

CASES = [
    dict(length=127),                                        # odd: padded to a multiple of the slices
    dict(length=130, rows=2, documents=[1, 50, 33, 46]),     # packed, different per row, documents crossing ranks
]


def reference(model, data):
    """Loss, logits and gradients of the plain model, each packed document run on its own (transformers' Gated
    DeltaNet without flash-linear-attention ignores document boundaries; longseq restarts the state at each)."""
    model.zero_grad()
    ids, labels = data["input_ids"], data["labels"]
    positions = data.get("position_ids", torch.arange(ids.shape[1]).expand_as(ids))
    rows = []
    for row in range(ids.shape[0]):
        bounds = document_boundaries(positions[row:row + 1])[0]
        rows.append(torch.cat([
            model(input_ids=ids[row:row + 1, a:b], position_ids=positions[row:row + 1, a:b], use_cache=False).logits
            for a, b in zip(bounds[:-1], bounds[1:])
        ], dim=1))
    logits = torch.cat(rows)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logits.detach(), grads


def compare(model, data, mesh, mode, memory=None, expect_equal=True):
    ref_loss, ref_logits, ref_grads = reference(copy.deepcopy(model), data)
    longseq.apply(model, mesh, memory, linear_attention=mode)
    loss, logits, grads = sharded(model, data, mesh)
    equal = (torch.allclose(loss, ref_loss, **_tol()) and torch.allclose(logits, ref_logits, **_tol())
             and all(torch.allclose(grads[n], ref_grads[n], **_tol()) for n in ref_grads))
    if expect_equal and not equal:
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(logits, ref_logits, **TOL)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")
    return equal


def _tol():
    return dict(atol=TOL["atol"], rtol=TOL["rtol"])


def _families(mode: str, families: tuple[str, ...]):
    mesh = longseq.init_mesh(sp=dist.get_world_size())
    for family in families:
        for case in CASES:
            compare(tiny_model(family), batch(**case), mesh, mode)


@pytest.mark.parametrize("mode", ["heads", "state"])
def test_families_sp2(mode):
    run_distributed(_families, 2, mode, HYBRIDS)


def _layouts(ring: int, mode: str, family: str):
    mesh = longseq.init_mesh(sp=4, ring=ring)
    for case in CASES:
        compare(tiny_model(family), batch(**case), mesh, mode)


@pytest.mark.parametrize("ring,mode,family", [
    (1, "heads", "qwen3_next"),   # 4 value heads, 2 key heads over 4 ranks: key heads copied
    (1, "state", "qwen3_5"),
    (2, "heads", "olmo_hybrid"),  # Ulysses over 2, the ring's two zigzag chunks per rank pass state
    (2, "state", "qwen3_next"),   # state over all 4 ranks in the zigzag order
])
def test_sp4(ring, mode, family):
    run_distributed(_layouts, 4, ring, mode, family)


def _fewer_heads_than_ranks():
    """2 value heads and 1 key head over 4 ranks: 'auto' passes state, 'heads' is refused naming the fix."""
    mesh = longseq.init_mesh(sp=4)
    few = dict(linear_num_key_heads=1, linear_num_value_heads=2)
    compare(tiny_model("qwen3_5", **few), batch(**CASES[1]), mesh, "auto")
    with pytest.raises(ValueError, match="cannot split 2 value heads and 1 key heads over the Ulysses degree 4"):
        longseq.apply(tiny_model("qwen3_5", **few), mesh, linear_attention="heads")


def test_fewer_heads_than_ranks():
    run_distributed(_fewer_heads_than_ranks, 4)


def _zeroed(name: str):
    """A mutation: `name` of parallel/linear_attention.py returning zeros (a rank that restarts from nothing)."""
    original = getattr(linear_attention, name)

    def zeros(*args, **kwargs):
        return torch.zeros_like(original(*args, **kwargs))

    return original, zeros


def _handoff_matters(ring: int, mode: str, name: str):
    """The tests above fail if a rank restarts the recurrent state (or the convolution) from zero."""
    mesh = longseq.init_mesh(sp=2, ring=ring)
    data = batch(**CASES[1])
    original, zeros = _zeroed(name)
    setattr(linear_attention, name, zeros)
    try:
        assert not compare(tiny_model("qwen3_next"), data, mesh, mode, expect_equal=False)
    finally:
        setattr(linear_attention, name, original)
    assert compare(tiny_model("qwen3_next"), data, mesh, mode)


@pytest.mark.parametrize("ring,mode,name", [
    (1, "state", "incoming_states"), (1, "state", "gather_halos"), (2, "heads", "incoming_states"),
])
def test_state_handoff_matters(ring, mode, name):
    run_distributed(_handoff_matters, 2, ring, mode, name)


def _memory_features():
    mesh = longseq.init_mesh(sp=2)
    memory = longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0)
    for family in ("qwen3_next", "qwen3_5"):
        compare(tiny_model(family), batch(**CASES[1]), mesh, "auto", memory=memory)


def test_memory_features():
    run_distributed(_memory_features, 2)


def _blocks_of_one_chunk(mode: str):
    """The recurrence in blocks of one chunk (Note [Chunked gated delta rule], Blocks), each recomputed in the
    backward inside the decoder layers' offloaded checkpoints."""
    delta_rule.BLOCK_CHUNKS = 1
    memory = longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0)
    data = batch(length=300, rows=2, documents=[1, 170, 129])  # documents of 3 chunks, crossing the ranks
    compare(tiny_model("qwen3_next"), data, longseq.init_mesh(sp=2), mode, memory=memory)


@pytest.mark.parametrize("mode", ["heads", "state"])
def test_blocks_of_one_chunk(mode):
    run_distributed(_blocks_of_one_chunk, 2, mode)


def test_documents_without_sp():
    """One process: longseq's layer restarts at documents where transformers' torch path would run across them."""
    compare(tiny_model("qwen3_5"), batch(**CASES[1]), longseq.Mesh(), "auto")


def test_refuses_other_token_mixers():
    import transformers

    with pytest.raises(ValueError, match="linear_attention='bogus' is not one of"):
        longseq.apply(tiny_model("qwen3_5"), longseq.Mesh(world_size=2, sp=2, ulysses=2), linear_attention="bogus")
    small = dict(hidden_size=64, num_hidden_layers=2, vocab_size=256)
    others = {
        "Lfm2ForCausalLM": transformers.Lfm2Config(**small, intermediate_size=128, num_attention_heads=4,
                                                   num_key_value_heads=2, layer_types=["conv", "full_attention"]),
        "FalconMambaForCausalLM": transformers.FalconMambaConfig(**small, state_size=4),
    }
    for name, config in others.items():
        model = transformers.AutoModelForCausalLM.from_config(config)
        with pytest.raises(ValueError, match=f"cannot run {name} sequence-parallel exactly.*Run it with sp=1"):
            longseq.apply(model, longseq.Mesh(world_size=2, sp=2, ulysses=2))


def _fsdp2(mode: str):
    """Under FSDP2 (as `longseq train` applies it), parameters are unsharded only inside each layer's forward."""
    from longseq.train.engine import apply_fsdp

    mesh = longseq.init_mesh(sp=2)
    model = tiny_model("qwen3_next")
    data = batch(**CASES[1])
    ref_loss, _, ref_grads = reference(copy.deepcopy(model), data)
    longseq.apply(model, mesh, longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0), linear_attention=mode)
    apply_fsdp(model, torch.device("cpu"), param_dtype=torch.float32, cpu_offload=False)
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["heads", "state"])
def test_fsdp2(mode):
    run_distributed(_fsdp2, 2, mode)


def _collectives(mode: str, forward: dict, backward: dict):
    """Per Gated DeltaNet layer: heads, one all-to-all each way; state, one all-gather of halos and one of states
    (an all-reduce each in backward). The model: one Gated DeltaNet layer, one attention layer."""
    mesh = longseq.init_mesh(sp=2)
    model = longseq.apply(tiny_model("qwen3_5"), mesh, linear_attention=mode)
    calls = dict.fromkeys(("all_to_all_single", "all_gather", "all_reduce"), 0)
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(dist, name, counting(name))
    try:
        loss = longseq.causal_lm_loss(model, longseq.shard_batch(batch(128), mesh), mesh)
        assert calls == forward, calls
        loss.backward()
        assert calls == backward, calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@pytest.mark.parametrize("mode,forward,backward", [
    # documents: 2 all-gathers; the loss: 1 all-reduce; attention: 2 all-to-alls (each way again in backward)
    ("heads", dict(all_to_all_single=4, all_gather=2, all_reduce=1), dict(all_to_all_single=8, all_gather=2,
                                                                         all_reduce=1)),
    ("state", dict(all_to_all_single=2, all_gather=4, all_reduce=1), dict(all_to_all_single=4, all_gather=4,
                                                                         all_reduce=3)),
])
def test_collective_counts(mode, forward, backward):
    run_distributed(_collectives, 2, mode, forward, backward)
