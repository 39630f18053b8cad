"""Checkpoint offload (memory/checkpoint_offload.py), the allocator default, and all memory features together.

    PYTHONPATH=src python -m pytest -q tests/test_checkpoint_offload.py
"""

from __future__ import annotations

import copy
import os
import weakref

import peft
import pytest
import torch

from longseq.memory import MemoryConfig, apply_checkpoint_offload, apply_memory, configure_allocator
from longseq.memory import lm_head_cross_entropy_sum, offload_stats
from longseq.memory.host_copy import HostCopy
from longseq.state import longseq_state
from tests.models import assert_grads_equal, shifted_labels, tiny_model

B, S, H, LAYERS = 2, 127, 64, 3


def _ids(seed=0, length=S):
    return torch.randint(0, 256, (B, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("keep", [0, 1])
@pytest.mark.parametrize("tiled_mlp", [False, True])
def test_offload_exact_and_host_memory_released(family, keep, tiled_mlp):
    reference = tiny_model(family, num_hidden_layers=LAYERS)
    config = MemoryConfig(tiled_mlp=tiled_mlp, tiled_loss=False, tile_tokens=32, keep_last_layers_on_gpu=keep,
                          offload_min_bytes=0, expandable_segments=False)
    model = apply_memory(copy.deepcopy(reference), config)
    ids = _ids()
    want = reference(ids, labels=ids).loss
    got = model(ids, labels=ids).loss
    torch.testing.assert_close(got, want)
    stats = offload_stats(model)
    offloaded = LAYERS - keep
    assert stats.current_bytes == offloaded * B * S * H * 4 and stats.offloaded_tensors == offloaded
    want.backward()
    got.backward()
    assert_grads_equal(reference, model)
    assert stats.current_bytes == 0 and stats.peak_bytes == offloaded * B * S * H * 4
    # Every restore but the first one of backward (when no layer is kept on the device) was prefetched.
    assert stats.prefetch_hits == offloaded - (keep == 0)


def test_restored_input_freed_when_its_layer_is_done(monkeypatch):
    """When layer i's input is restored, layer i+1's restored input is already gone (one layer ahead at most)."""
    model = apply_checkpoint_offload(tiny_model(num_hidden_layers=4), MemoryConfig(offload_min_bytes=0))
    taken, alive_at_take = [], []
    original_take = HostCopy.take

    def take(self, stats):
        alive_at_take.append(sum(ref() is not None for ref in taken))
        restored = original_take(self, stats)
        taken.append(weakref.ref(restored))
        return restored

    monkeypatch.setattr(HostCopy, "take", take)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    assert alive_at_take == [0, 0, 0, 0]


def test_small_shared_and_parameter_tensors_stay_on_device():
    model = apply_checkpoint_offload(tiny_model(), MemoryConfig())  # 1 MiB threshold: nothing this small moves
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    stats = offload_stats(model)
    assert stats.peak_bytes == 0 and stats.offloaded_tensors == 0

    offloader = longseq_state(model).offloader
    offloader.min_bytes = 0
    shared = torch.randn(1000, requires_grad=True)
    parameter = torch.nn.Parameter(torch.randn(1000))
    with offloader.hooks(0):
        first = shared.sin()  # saves `shared`: moved
    with offloader.hooks(1):
        again = shared.cos()  # `shared` again, still alive: kept (moving it would free nothing)
        fresh = (shared * 2).sin()  # a new tensor: moved
        kept = parameter.sin()  # parameters stay
    assert stats.offloaded_tensors == 2
    grads = torch.autograd.grad((first + again + fresh + kept).sum(), [shared, parameter])
    torch.testing.assert_close(grads[0], shared.cos() - shared.sin() + 2 * (2 * shared).cos())
    torch.testing.assert_close(grads[1], parameter.cos())
    assert not offloader.should_offload(torch.arange(1000))  # integer tensors (indices) stay


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_refuses_double_checkpointing(enable):
    model = tiny_model()
    getattr(model, enable)()
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        apply_checkpoint_offload(model, MemoryConfig())
    model = apply_checkpoint_offload(tiny_model(), MemoryConfig())
    getattr(model, enable)()
    ids = _ids()
    with pytest.raises(RuntimeError, match="offload_checkpoints=False"):
        model(ids, labels=ids)


def test_eval_and_no_grad_run_plain():
    reference = tiny_model().eval()
    model = apply_checkpoint_offload(copy.deepcopy(reference), MemoryConfig(offload_min_bytes=0))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model.train()(ids).logits, reference(ids).logits)
    torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits)
    assert offload_stats(model).offloaded_tensors == 0


def _everything(model, ids, config):
    hidden = model.get_base_model().model(ids).last_hidden_state if hasattr(model, "get_base_model") \
        else model.model(ids).last_hidden_state
    total, count = lm_head_cross_entropy_sum(model, hidden, shifted_labels(ids), config)
    return total / count


def _check_everything(reference, model, ids, config):
    """Loss and every gradient of the fully featured model equal the plain transformers model's."""
    want = reference(ids, labels=ids).loss
    got = _everything(model, ids, config)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    assert_grads_equal(reference, model)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_all_features_together(family):
    reference = tiny_model(family, num_hidden_layers=LAYERS, tie_word_embeddings=True)
    config = MemoryConfig(tile_tokens=40, keep_last_layers_on_gpu=1, offload_min_bytes=0, expandable_segments=False)
    model = apply_memory(copy.deepcopy(reference), config)
    _check_everything(reference, model, _ids(1, 301), config)
    assert offload_stats(model).peak_bytes > 0 and offload_stats(model).current_bytes == 0


def test_all_features_together_with_lora():
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    reference = peft.get_peft_model(tiny_model(num_hidden_layers=LAYERS), lora)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    config = MemoryConfig(tile_tokens=40, offload_min_bytes=0, expandable_segments=False)
    model = apply_memory(copy.deepcopy(reference), config)
    _check_everything(reference, model, _ids(2, 201), config)
    assert offload_stats(model).offloaded_tensors > 0


@pytest.fixture
def clean_alloc_env(monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_allocator_default_before_cuda_init(clean_alloc_env):
    clean_alloc_env.setattr(torch.cuda, "is_initialized", lambda: False)
    assert configure_allocator() == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_allocator_keeps_user_choice(clean_alloc_env, name):
    clean_alloc_env.setenv(name, "backend:cudaMallocAsync")
    assert configure_allocator() is None
    assert os.environ[name] == "backend:cudaMallocAsync"
    assert (name == "PYTORCH_ALLOC_CONF") == ("PYTORCH_CUDA_ALLOC_CONF" not in os.environ)


def test_allocator_after_cuda_init(clean_alloc_env):
    calls = []
    clean_alloc_env.setattr(torch.cuda, "is_initialized", lambda: True)
    clean_alloc_env.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert configure_allocator() == "expandable_segments:True"
    assert calls == ["expandable_segments:True"] and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_apply_memory_switches():
    model = apply_memory(tiny_model(), MemoryConfig(tiled_mlp=False, offload_checkpoints=False,
                                                    expandable_segments=False))
    assert "forward" not in vars(model.model.layers[0].mlp) and longseq_state(model) is None


def test_wraps_an_existing_instance_forward_and_applies_once():
    model = tiny_model()
    calls = []
    for layer in model.model.layers:
        layer.forward = lambda *a, _inner=layer.forward, **k: calls.append(1) or _inner(*a, **k)
    config = MemoryConfig(tile_tokens=16, offload_min_bytes=0, expandable_segments=False)
    apply_memory(model, config)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 4  # 2 layers × (forward + recompute in backward)
    with pytest.raises(ValueError, match="once"):
        apply_checkpoint_offload(model, config)
    with pytest.raises(ValueError, match="once"):
        apply_memory(model, MemoryConfig(offload_checkpoints=False, expandable_segments=False))
