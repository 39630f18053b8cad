"""Tiled compute (memory/tiled.py) against the untiled computation: outputs and every gradient.

    PYTHONPATH=src python -m pytest -q tests/test_tiled.py
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F

from longseq.memory import MemoryConfig, apply_tiled_mlp, apply_tiled_norms, tiled
from longseq.memory.tiled import TiledFunction, mlp_tile_tokens, norm_tile_tokens
from longseq.models.anatomy import decoder_norms
from tests.models import FAMILIES, assert_grads_equal, tiny_model


@pytest.mark.parametrize("tile", [10, 32, 200])
@pytest.mark.parametrize("shape", [(2, 127, 8), (127, 8)])
def test_tiled_matches_untiled(tile, shape):
    torch.manual_seed(0)
    up, down = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)
    params = [*up.parameters(), *down.parameters()]

    def fn(x):
        return down(F.gelu(up(x)) * x.sum(-1, keepdim=True))

    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(shape)
    ref = fn(x)
    ref_grads = torch.autograd.grad((ref * weight).sum(), [x, *params])
    out = tiled(fn, x, *params, tile_tokens=tile)
    assert (out.grad_fn is not None) and (type(out.grad_fn).__name__ == "TiledFunctionBackward") == (tile < 127)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad((out * weight).sum(), [x, *params]), ref_grads):
        torch.testing.assert_close(got, want)


def test_tiled_frozen_input_and_partial_params():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    lin.bias.requires_grad_(False)
    x = torch.randn(1, 50, 8)
    out = TiledFunction.apply(lin, 7, x, lin.weight)
    (grad,) = torch.autograd.grad(out.square().sum(), [lin.weight])
    (want,) = torch.autograd.grad(lin(x).square().sum(), [lin.weight])
    torch.testing.assert_close(grad, want)


def test_tile_size_from_memory_target():
    config = MemoryConfig(tile_memory_mib=1)
    # 1 MiB / (1 × 128 × 3 × 4 bytes) = 682 positions; halves with batch 2; doubles in bf16.
    assert mlp_tile_tokens(config, 128, 1, torch.float32) == 682
    assert mlp_tile_tokens(config, 128, 2, torch.float32) == 341
    assert mlp_tile_tokens(config, 128, 1, torch.bfloat16) == 1365
    assert mlp_tile_tokens(MemoryConfig(tile_tokens=7), 128, 4, torch.float32) == 7
    # Norms: about three fp32 rows per token: 1 MiB / (1 × 64 × 3 × 4 bytes) = 1365 positions; halves with batch 2.
    assert norm_tile_tokens(config, 64, 1) == 1365
    assert norm_tile_tokens(config, 64, 2) == 682
    assert norm_tile_tokens(MemoryConfig(tile_tokens=7), 64, 4) == 7


def _count_tiled_calls(model):
    calls = []
    for layer in model.get_decoder().layers:
        layer.mlp.register_forward_hook(lambda m, i, o: calls.append(type(o.grad_fn).__name__))
    return calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("length", [127, 1001])
def test_apply_tiled_mlp_exact(family, length):
    reference = tiny_model(family)
    model = apply_tiled_mlp(copy.deepcopy(reference), MemoryConfig(tile_tokens=48))
    calls = _count_tiled_calls(model)
    ids = torch.randint(0, 256, (2 if length < 1000 else 1, length), generator=torch.Generator().manual_seed(1))
    want = reference(ids, labels=ids).loss
    got = model(ids, labels=ids).loss
    assert calls == ["TiledFunctionBackward"] * 2
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    assert_grads_equal(reference, model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_apply_tiled_norms_exact(family):
    reference = tiny_model(family)
    model = apply_tiled_norms(copy.deepcopy(reference), MemoryConfig(tile_tokens=48))
    wrapped = decoder_norms(model)
    assert all(hasattr(m, "_longseq_inner_forward") for m in wrapped)
    assert len(wrapped) >= 2 * len(model.get_decoder().layers) + 1  # per layer at least two, and the final norm
    calls = []
    for norm in wrapped:
        norm.register_forward_hook(lambda m, i, o: calls.append(type(o.grad_fn).__name__))
    ids = torch.randint(0, 256, (2, 127), generator=torch.Generator().manual_seed(1))
    want = reference(ids, labels=ids).loss
    got = model(ids, labels=ids).loss
    assert set(calls) == {"TiledFunctionBackward"}
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    assert_grads_equal(reference, model)


def _saved_norm_outputs(model, ids) -> tuple[int, torch.Tensor]:
    """How many tensors saved for backward are outputs of a decoder layer's norm, and the loss."""
    outputs, saved = [], []  # the outputs stay referenced, so no other tensor can reuse their memory
    for norm in decoder_norms(model)[:-1]:  # the final norm's output goes to the loss
        norm.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        loss = model(ids, labels=ids).loss
    return len({o.untyped_storage().data_ptr() for o in outputs} & set(saved)), loss


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_norms_fused_into_their_readers(family):
    """With fuse_norms, no norm output is kept for backward (the q/k/v projections and the MLP recompute it from the
    norm's input); without, some are. Loss and every gradient equal the plain model's either way, with LoRA too."""
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    reference = peft.get_peft_model(tiny_model(family), lora)
    ids = torch.randint(0, 256, (2, 127), generator=torch.Generator().manual_seed(1))
    want = reference(ids, labels=ids).loss
    want.backward()
    for fuse in (True, False):
        config = MemoryConfig(tile_tokens=48, fuse_norms=fuse)
        model = apply_tiled_norms(apply_tiled_mlp(copy.deepcopy(reference), config), config)
        model.zero_grad()
        kept, got = _saved_norm_outputs(model, ids)
        assert (kept == 0) == fuse
        torch.testing.assert_close(got, want)
        got.backward()
        assert_grads_equal(reference, model)


def test_short_sequences_run_plain():
    model = apply_tiled_mlp(tiny_model(), MemoryConfig(tile_tokens=64))
    calls = _count_tiled_calls(model)
    model(torch.randint(0, 256, (1, 64)))
    assert "TiledFunctionBackward" not in calls and len(calls) == 2


def test_apply_tiled_mlp_through_peft_lora():
    lora = peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], lora_alpha=8)
    reference = peft.get_peft_model(tiny_model(), lora)
    for name, p in reference.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the LoRA path contribute so its A grads are non-zero
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    model = apply_tiled_mlp(copy.deepcopy(reference), MemoryConfig(tile_tokens=40))
    ids = torch.randint(0, 256, (1, 301), generator=torch.Generator().manual_seed(2))
    reference(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    assert_grads_equal(reference, model)
    assert any("lora" in n for n, p in model.named_parameters() if p.requires_grad)


def test_apply_tiled_mlp_refuses_models_without_mlp():
    model = tiny_model()
    for layer in model.get_decoder().layers:
        layer.mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match="tiled_mlp=False"):
        apply_tiled_mlp(model, MemoryConfig())
    with pytest.raises(ValueError, match="no decoder layers"):
        apply_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(2, 2)), MemoryConfig())


def test_bf16_parameter_gradients_sum_over_tiles_in_fp32():
    """128 tiles in bf16: parameter gradients stay as close to the exact ones as the untiled bf16 MLP's (summing the
    tiles' partial gradients in bf16 would round once per tile: several times the error at this tile count)."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(128, 64, generator=g) / 8, torch.randn(64, 128, generator=g) / 11]
    x = torch.randn(1, 8192, 64, generator=g) + 0.5
    grad_out = torch.randn(1, 8192, 64, generator=g)

    def mlp(x, w1, w2):
        return F.silu(x @ w1.T) @ w2.T

    def param_grads(dtype, tile):
        params = [w.to(dtype).requires_grad_() for w in weights]
        inputs = x.to(dtype)
        out = tiled(lambda t: mlp(t, *params), inputs, *params, tile_tokens=tile) if tile else mlp(inputs, *params)
        return torch.autograd.grad(out, params, grad_out.to(dtype))

    exact = param_grads(torch.float64, None)

    def error(grads):
        return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(grads, exact))

    untiled, tiled_error = error(param_grads(torch.bfloat16, None)), error(param_grads(torch.bfloat16, 64))
    assert tiled_error <= 1.5 * untiled, (tiled_error, untiled)
