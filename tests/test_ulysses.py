"""Ulysses sequence parallelism against the unsharded transformers model: loss, logits, every gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import longseq
from longseq.parallel.local import causal_attention
from longseq.parallel.ulysses import heads_to_sequence_split, sequence_to_heads_split
from tests.distributed import run_distributed
from tests.models import batch, tiny_model

TOL = dict(atol=3e-5, rtol=1e-4)


def reference(model, data):
    """Loss, logits and parameter gradients of the plain model on the whole batch."""
    model.zero_grad()
    out = model(**data, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def sharded(model, data, mesh):
    model.zero_grad()
    local = longseq.shard_batch(data, mesh)
    loss = longseq.causal_lm_loss(model, local, mesh)
    loss.backward()
    longseq.sync_gradients(model, mesh)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    logits = longseq.gather_sequence(logits, mesh, length=data["input_ids"].shape[1])
    return loss.detach(), logits, grads


def compare(model, data, mesh, tol=TOL, memory=None):
    reference_model = copy.deepcopy(model)
    ref_loss, ref_logits, ref_grads = reference(reference_model, data)
    longseq.apply(model, mesh, memory)
    loss, logits, grads = sharded(model, data, mesh)
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")


CASES = [
    dict(length=127),
    dict(length=1001, rows=2),
    dict(length=130, rows=2, documents=[1, 50, 33, 46]),
]


def _family(family: str, sp: int, overrides: dict):
    mesh = longseq.init_mesh(sp=sp)
    assert (mesh.sp, mesh.ulysses, mesh.ring) == (sp, sp, 1)
    for case in CASES:
        compare(tiny_model(family, **overrides), batch(**case), mesh)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
def test_families_sp2(family):
    run_distributed(_family, 2, family, 2, {})


@pytest.mark.parametrize("family,overrides", [
    ("llama", {"num_key_value_heads": 2}),  # kv heads < sp: replicated
    ("qwen3", {"num_key_value_heads": 1}),  # MQA
    ("gemma3", {}),
])
def test_sp4(family, overrides):
    run_distributed(_family, 4, family, 4, overrides)


def _dp_and_peft():
    from peft import LoraConfig, get_peft_model

    mesh = longseq.init_mesh(sp=2, dp=2)
    assert (mesh.dp, mesh.sp) == (2, 2)
    # Each dp replica sees its own batch; the reference sees both, concatenated along the batch.
    rows = [batch(101, seed=11), batch(101, seed=12)]
    full = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    base = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    reference_model = copy.deepcopy(model)
    ref_loss = reference_model(**full, use_cache=False).loss
    ref_loss.backward()
    longseq.apply(model, mesh)
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(rows[mesh.dp_rank], mesh), mesh)
    loss.backward()
    longseq.sync_gradients(model, mesh)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    ref = dict(reference_model.named_parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora" in n for n, _ in trained)
    for name, p in trained:
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL)


def test_data_parallel_with_peft():
    run_distributed(_dp_and_peft, 4)


def _attention_level(sp: int):
    """The Ulysses exchange around the local kernel equals the kernel on the whole sequence: output and q/k/v grads."""
    mesh = longseq.init_mesh(sp=sp)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 36, 8), torch.randn(2, 2, 36, 8), torch.randn(2, 2, 36, 8)
    grad = torch.randn(2, 36, 4, 8)
    for t in (q, k, v):
        t.requires_grad_()
    bounds = [[0, 5, 36], [0, 36]]
    ref = causal_attention(q, k, v, scale=0.3, boundaries=bounds).transpose(1, 2)
    ref.backward(grad)
    s = 36 // sp
    mine = slice(mesh.sp_rank * s, (mesh.sp_rank + 1) * s)
    lq, lk, lv = (t.detach()[:, :, mine].clone().requires_grad_() for t in (q, k, v))
    sq, sk, sv = heads_to_sequence_split(mesh.ulysses_group, lq, lk, lv, replicate_kv=2 if sp == 4 else 1)
    out = sequence_to_heads_split(mesh.ulysses_group, causal_attention(sq, sk, sv, scale=0.3, boundaries=bounds)
                                  .transpose(1, 2))
    torch.testing.assert_close(out, ref[:, mine], **TOL)
    out.backward(grad[:, mine])
    for local, full in ((lq, q), (lk, k), (lv, v)):
        torch.testing.assert_close(local.grad, full.grad[:, :, mine], **TOL)


@pytest.mark.parametrize("sp", [2, 4])
def test_attention_exchange(sp):
    run_distributed(_attention_level, sp, sp)


def _flex_forward(family: str, ring: int):
    """FlexAttention under Ulysses, ring (flex block kernels) or both: logits equal the unsharded model's (CPU flex
    has no backward: forward only; the ring's flex backward is tested in test_ring.py and bench/check_gpu.py)."""
    mesh = longseq.init_mesh(sp=dist.get_world_size(), ring=ring)
    model = tiny_model(family, attn="flex_attention").eval()
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    data = batch(130, rows=2, documents=[1, 50, 33, 46])
    longseq.apply(model, mesh)
    local = longseq.shard_batch(data, mesh)
    with torch.no_grad():
        ref = reference(input_ids=data["input_ids"], position_ids=data["position_ids"], use_cache=False).logits
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    torch.testing.assert_close(longseq.gather_sequence(logits, mesh, 130), ref, **TOL)


@pytest.mark.parametrize("family,sp,ring", [("llama", 2, 1), ("gemma3", 2, 1), ("llama", 2, 2), ("llama", 4, 2)])
def test_flex_attention_forward(family, sp, ring):
    run_distributed(_flex_forward, sp, family, ring)


def _fake_flash(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                position_ids=None, **kwargs):
    """Stands in for flash-attention's transformers wrapper: documents from position_ids, (B, S, H, D) out."""
    from longseq.parallel.documents import document_boundaries

    assert attention_mask is None
    out = causal_attention(query, key, value, scale=scaling, boundaries=document_boundaries(position_ids),
                           sliding_window=sliding_window)
    return out.transpose(1, 2), None


def _flash_delegation(family: str):
    """What longseq hands a flash kernel (gathered heads, per-document position_ids, window) gives exact results."""
    from transformers import AttentionInterface

    AttentionInterface.register("flash_attention_2", _fake_flash)
    mesh = longseq.init_mesh(sp=2)
    model = tiny_model(family)
    reference_model = copy.deepcopy(model)
    data = batch(130, rows=2, documents=[1, 50, 33, 46])
    ref_loss, _, ref_grads = reference(reference_model, data)
    longseq.apply(model, mesh, attention="flash_attention_2")
    loss, _, grads = sharded(model, data, mesh)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_flash_attention_delegation(family):
    run_distributed(_flash_delegation, 2, family)


def _collectives():
    """One all-to-all each way per layer (q, k, v travel together) and two tiny all-gathers per forward."""
    mesh = longseq.init_mesh(sp=2)
    model = longseq.apply(tiny_model("llama"), mesh)
    calls = {"all_to_all_single": 0, "all_gather": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(dist, name, counting(name))
    try:
        loss = longseq.causal_lm_loss(model, longseq.shard_batch(batch(64), mesh), mesh)
        assert calls == {"all_to_all_single": 2 * 2, "all_gather": 2}, calls
        loss.backward()
        assert calls["all_to_all_single"] == 2 * 2 * 2, calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def test_collective_counts():
    run_distributed(_collectives, 2)


def _errors():
    with pytest.raises(ValueError, match="sp=3 is larger than the world size 2"):
        longseq.init_mesh(sp=3)
    mesh = longseq.init_mesh(sp=2)
    model = longseq.apply(tiny_model("llama"), mesh)
    # Ranks holding different numbers of tokens: every rank raises, none hangs.
    length = 8 + 2 * mesh.rank
    local = {"input_ids": torch.zeros(1, length, dtype=torch.long),
             "position_ids": torch.arange(length)[None] + 100 * mesh.rank}
    with pytest.raises(ValueError, match="different numbers of tokens"):
        model(**local)


def test_distributed_errors():
    run_distributed(_errors, 2)


def _world_not_divisible():
    with pytest.raises(ValueError, match="world size 4 is not divisible by sp=3"):
        longseq.init_mesh(sp=3)


def test_world_not_divisible():
    run_distributed(_world_not_divisible, 4)


def test_errors_single_process():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        longseq.init_mesh(sp=2)
    fake = longseq.Mesh(world_size=3, sp=3, ulysses=3)
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        longseq.apply(tiny_model("llama"), fake)
    with pytest.raises(ValueError, match="6 key/value heads"):
        longseq.apply(tiny_model("llama", hidden_size=96, num_attention_heads=12, num_key_value_heads=6),
                      longseq.Mesh(world_size=4, sp=4, ulysses=4))
    with pytest.raises(ValueError, match="eager"):
        longseq.apply(tiny_model("llama", attn="eager"), longseq.Mesh(world_size=2, sp=2, ulysses=2))
    overridden = longseq.apply(tiny_model("llama", attn="eager"), longseq.Mesh(world_size=2, sp=2, ulysses=2),
                               attention="sdpa")
    assert overridden.config._attn_implementation.startswith("longseq_sp_")
    with pytest.raises(ValueError, match="too short for sp=4"):
        longseq.shard_batch(batch(3), longseq.Mesh(world_size=4, sp=4, ulysses=4))
    with pytest.raises(ValueError, match="left padding"):
        longseq.shard_batch({"input_ids": torch.ones(1, 4, dtype=torch.long),
                             "attention_mask": torch.tensor([[0, 1, 1, 1]])}, longseq.Mesh())
    model = longseq.apply(tiny_model("llama"), longseq.Mesh(world_size=2, sp=2, ulysses=2))
    with pytest.raises(ValueError, match="needs position_ids"):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shift_labels"):
        longseq.causal_lm_loss(model, batch(8))


def test_shard_batch_layout():
    """Labels are shifted before slicing, rows are padded with ignored labels, positions stay global."""
    data = batch(7)
    mesh = longseq.Mesh(world_size=4, rank=3, sp=4, ulysses=4)
    local = longseq.shard_batch(data, mesh)
    assert local["input_ids"].shape == (1, 2)
    assert local["position_ids"].tolist() == [[6, 7]]
    assert local["shift_labels"].tolist() == [[-100, -100]]
    first = longseq.shard_batch(data, longseq.Mesh(world_size=4, rank=0, sp=4, ulysses=4))
    assert first["shift_labels"][0, 1] == data["labels"][0, 2]


def test_single_process_loss_matches_hf():
    """sp=1 (no mesh): the loss entry point and the plain transformers loss agree, including packed rows."""
    model = tiny_model("gemma2")
    data = batch(90, rows=2, documents=[30, 60])
    ref_loss, _, ref_grads = reference(copy.deepcopy(model), data)
    longseq.apply(model)
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, longseq.Mesh()))
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], **TOL)


def test_registered_attention_does_not_keep_the_mesh_alive():
    """transformers' attention registry lives until exit; the mesh (and its process groups) must go with the model."""
    import gc
    import weakref

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mesh = longseq.Mesh()
    model = longseq.apply(tiny_model(), mesh, longseq.MemoryConfig())  # one GPU + attention cache: registers
    name, mesh_ref = model.config._attn_implementation, weakref.ref(mesh)
    attention = ALL_ATTENTION_FUNCTIONS[name]
    del model, mesh
    gc.collect()
    assert mesh_ref() is None
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="no longer exists"):
        attention(None, q, q, q, None)
