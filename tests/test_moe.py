"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral, GPT-OSS) against the unsharded transformers model: the loss with
the router load-balancing loss, the router loss itself, and every gradient; tiled experts; Ulysses, ring, hybrid;
data parallelism; GPT-OSS's attention sinks and sliding windows.

    PYTHONPATH=src python -m pytest -q tests/test_moe.py
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.distributed as dist

import longseq
from longseq.parallel.documents import document_boundaries
from tests.distributed import run_distributed
from tests.models import MOE_FAMILIES, batch, tiny_model

TOL = dict(atol=3e-5, rtol=1e-4)
CASES = [
    dict(length=127),                                       # odd: shard_batch pads; padding is no router row
    dict(length=130, rows=2, documents=[1, 50, 33, 46]),    # packed, different per row, documents crossing ranks
]
FAMILY_NAMES = sorted(MOE_FAMILIES)


def _document_mask(position_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """Additive (B, 1, S, S) mask: causal, within documents, and within the window."""
    batch_size, length = position_ids.shape
    doc = torch.zeros(batch_size, length, dtype=torch.long)
    for row, starts in enumerate(document_boundaries(position_ids)):
        for start in starts[1:-1]:
            doc[row, start:] += 1
    pos = torch.arange(length)
    distance = pos[:, None] - pos[None, :]
    allowed = (distance >= 0) & (doc[:, :, None] == doc[:, None, :])
    if window is not None:
        allowed &= distance < window
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def _gpt_oss_with_documents(model, data):
    """transformers' GPT-OSS builds its masks without position_ids (no packed documents), so the reference gets
    per-document masks, and the router loss from transformers' own load_balancing_loss_func."""
    config = model.config
    masks = {"full_attention": _document_mask(data["position_ids"], None),
             "sliding_attention": _document_mask(data["position_ids"], config.sliding_window)}
    out = model.model(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=masks,
                      output_router_logits=True, use_cache=False)
    loss = model.loss_function(model.lm_head(out.last_hidden_state), data["labels"], config.vocab_size)
    balance = sys.modules[type(model).__module__].load_balancing_loss_func
    aux = balance(out.router_logits, config.num_local_experts, config.num_experts_per_tok, None)
    return loss + config.router_aux_loss_coef * aux, aux


def reference(model, data):
    """Loss (router loss included), router loss and parameter gradients of the plain model on the whole batch."""
    model.zero_grad()
    if model.config.model_type == "gpt_oss":
        model.config._attn_implementation = "eager"  # the reference attention for sinks
        if "position_ids" in data:
            loss, aux = _gpt_oss_with_documents(model, data)
        else:
            out = model(**data, use_cache=False)
            loss, aux = out.loss, out.aux_loss
    else:
        out = model(**data, use_cache=False)
        loss, aux = out.loss, out.aux_loss
    loss.backward()
    return loss.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sharded(model, data, mesh):
    model.zero_grad()
    out = model(**longseq.shard_batch(data, mesh), use_cache=False)
    out.loss.backward()
    longseq.sync_gradients(model, mesh)
    return out.loss.detach(), out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}


def assert_same(got, want, tol=TOL):
    (loss, aux, grads), (ref_loss, ref_aux, ref_grads) = got, want
    torch.testing.assert_close(aux, ref_aux, **tol)
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")


def compare(family: str, data: dict, mesh, memory=None, **overrides):
    model = tiny_model(family, **overrides)
    want = reference(copy.deepcopy(model), data)
    longseq.apply(model, mesh, memory)
    assert_same(sharded(model, data, mesh), want)


# One process: tiled experts, checkpoint offload, GPT-OSS's sinks on longseq's attention at sp = 1.

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiled_experts_with_offload(family):
    """Expert blocks over 16-token tiles (their backward is the tiles'), every layer checkpointed and recomputed."""
    model = tiny_model(family)
    want = reference(copy.deepcopy(model), batch(**CASES[1]))
    longseq.apply(model, longseq.Mesh(), longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0))
    tiled = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, i, o: tiled.append(type((o[0] if isinstance(o, tuple) else o)
                                                                            .grad_fn).__name__))
    got = sharded(model, batch(**CASES[1]), longseq.Mesh())
    assert "TiledExpertsFunctionBackward" in tiled
    assert_same(got, want)


def test_router_loss_excludes_padding():
    """Right padding marked by attention_mask: neither the loss nor the router statistics count it."""
    data = batch(60, rows=2)
    data["attention_mask"] = torch.ones(2, 60, dtype=torch.long)
    data["attention_mask"][1, 41:] = 0
    data["labels"][1, 41:] = -100
    model = tiny_model("mixtral")
    want = reference(copy.deepcopy(model), data)
    longseq.apply(model, longseq.Mesh(), longseq.MemoryConfig(tile_tokens=16))
    local = longseq.shard_batch(data, longseq.Mesh())
    assert local["token_mask"].sum() == 60 + 41
    assert_same(sharded(model, data, longseq.Mesh()), want)


def test_gradient_accumulation_weights_router_loss_by_tokens():
    """num_tokens over two micro-batches: the cross-entropy is the window's mean, and each micro-step's router loss
    weighs by its micro-batch's share of the window's valid tokens."""
    micro = [batch(70, seed=5), batch(41, rows=2, seed=6)]
    counts = [int((m["labels"][:, 1:] != -100).sum()) for m in micro]
    total = sum(counts)
    model = tiny_model("qwen3_moe")
    reference_model = copy.deepcopy(model)
    want = []
    for data, count in zip(micro, counts):
        out = reference_model(**data, use_cache=False)
        want.append(out.loss * count / total)  # (mean cross-entropy + coef · aux) · the micro-batch's share
        want[-1].backward()
    longseq.apply(model, longseq.Mesh(), longseq.MemoryConfig(tile_tokens=16))
    got = []
    for data in micro:
        got.append(longseq.causal_lm_loss(model, longseq.shard_batch(data, longseq.Mesh()),
                                          num_tokens=torch.tensor(float(total))))
        got[-1].backward()
    torch.testing.assert_close(sum(got).detach(), sum(want).detach(), **TOL)
    ref_grads = dict(reference_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_gpt_oss_sinks_on_one_gpu():
    """attention='sdpa' on one GPU: transformers' SDPA would drop the sinks, so longseq's attention serves it."""
    model = tiny_model("gpt_oss")
    assert model.config._attn_implementation == "sdpa"
    want = reference(copy.deepcopy(model), batch(**CASES[0]))
    longseq.apply(model, longseq.Mesh())
    assert model.config._attn_implementation.startswith("longseq_sp_")
    assert_same(sharded(model, batch(**CASES[0]), longseq.Mesh()), want)


def test_refusals():
    with pytest.raises(ValueError, match="router_jitter_noise=0.1 multiplies"):
        longseq.apply(tiny_model("mixtral", router_jitter_noise=0.1), None, longseq.MemoryConfig())
    import transformers

    config = transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_experts=4,
                                         output_router_logits=True)
    other = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"'qwen2_moe' is not one of them, and its config sets output_router"):
        longseq.apply(other, None)
    other.config.output_router_logits = False
    longseq.apply(other, None, longseq.MemoryConfig())  # its expert blocks run as they are
    mesh = longseq.Mesh(world_size=2, sp=2, ulysses=2)
    with pytest.raises(ValueError, match="eager"):
        longseq.apply(tiny_model("gpt_oss", attn="eager"), mesh)


# Several processes.

def _layouts(sp: int, ring: int, families: list[str], cases: list[int]):
    mesh = longseq.init_mesh(sp=sp, ring=ring)
    assert (mesh.ulysses, mesh.ring) == (sp // ring, ring)
    for family in families:
        for case in cases:
            compare(family, batch(**CASES[case]), mesh)


@pytest.mark.parametrize("sp,ring,families,cases", [
    (2, 1, FAMILY_NAMES, [0, 1]),             # Ulysses
    (2, 2, FAMILY_NAMES, [0, 1]),             # ring: sliding windows and sinks on ring blocks
    (4, 2, FAMILY_NAMES, [1]),                # hybrid
    (4, 1, ["gpt_oss", "qwen3_moe"], [1]),    # Ulysses 4 over 2 KV heads (replicated)
    (4, 4, ["gpt_oss"], [0]),                 # ring 4
])
def test_sharded_equals_unsharded(sp, ring, families, cases):
    run_distributed(_layouts, sp, sp, ring, families, cases)


def _memory_with_sp(ring: int):
    mesh = longseq.init_mesh(sp=2, ring=ring)
    memory = longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0)
    for family in FAMILY_NAMES:
        compare(family, batch(**CASES[0]), mesh, memory)


@pytest.mark.parametrize("ring", [1, 2])
def test_memory_features_with_sp(ring):
    run_distributed(_memory_with_sp, 2, ring)


def _data_parallel():
    """dp = 2 × sp = 2: the router loss pools both replicas' rows, as the model does on the concatenated batch."""
    mesh = longseq.init_mesh(sp=2, dp=2)
    rows = [batch(101, seed=11), batch(101, seed=12)]
    full = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    model = tiny_model("mixtral")
    want = reference(copy.deepcopy(model), full)
    longseq.apply(model, mesh, longseq.MemoryConfig(tile_tokens=16))
    got = sharded(model, rows[mesh.dp_rank], mesh)
    assert_same(got, want)
    # Each replica's own router loss differs from the pooled one: pooling over dp is not a no-op here.
    own = reference(copy.deepcopy(tiny_model("mixtral")), rows[mesh.dp_rank])[1]
    assert not torch.allclose(own, want[1], atol=1e-6)
    assert dist.get_world_size() == 4


def test_data_parallel():
    run_distributed(_data_parallel, 4)
