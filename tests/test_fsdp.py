"""The library under FSDP2 (as `longseq train` applies it): sequence parallelism and every memory feature give the
unsharded model's loss and gradients, with FSDP2's own gradient averaging (Note [Exact global loss])."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import longseq
from longseq.train.engine import apply_fsdp, offloaded_state_bytes
from tests.distributed import run_distributed
from tests.models import batch, tiny_model

TOL = dict(atol=3e-5, rtol=1e-4)


def _fsdp(ring: int, memory: bool, layers_per_checkpoint: int = 1):
    mesh = longseq.init_mesh(sp=2, ring=ring)
    model = tiny_model("llama", tie_word_embeddings=True, num_hidden_layers=3)
    reference = copy.deepcopy(model)
    data = batch(130, rows=2, documents=[1, 50, 33, 46])
    ref_loss = reference(**data, use_cache=False).loss
    ref_loss.backward()
    config = longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0, layers_per_checkpoint=layers_per_checkpoint,
                                  attention_heads_per_call=1) if memory else None
    longseq.apply(model, mesh, config)
    apply_fsdp(model, torch.device("cpu"), param_dtype=torch.float32, cpu_offload=False)
    # What CPU offload would reserve on the host: gradient + two AdamW moments of this rank's shard (fp32).
    state = torch.tensor(offloaded_state_bytes(model))
    dist.all_reduce(state)
    assert state.item() == 3 * 4 * sum(p.numel() for p in reference.parameters())
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), expected[name].grad, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("ring,memory,layers_per_checkpoint", [(1, True, 1), (2, True, 1), (1, False, 1), (1, True, 2)])
def test_fsdp2_matches_unsharded(ring, memory, layers_per_checkpoint):
    """layers_per_checkpoint=2: the segment rebuild runs layer 0 while FSDP2 holds it sharded (layer 1 in backward)."""
    run_distributed(_fsdp, 2, ring, memory, layers_per_checkpoint)


def _fsdp_experts():
    """GPT-OSS under FSDP2 at sp = 2 with every memory feature: tiled experts see the unsharded parameters, and the
    router loss joins the loss."""
    mesh = longseq.init_mesh(sp=2)
    model = tiny_model("gpt_oss")
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "eager"
    data = batch(127, rows=2)
    ref_loss = reference(**data, use_cache=False).loss
    ref_loss.backward()
    longseq.apply(model, mesh, longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0))
    apply_fsdp(model, torch.device("cpu"), param_dtype=torch.float32, cpu_offload=False)
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), expected[name].grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_fsdp2_mixture_of_experts():
    run_distributed(_fsdp_experts, 2)
