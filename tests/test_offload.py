"""Checkpoint offload (memory/offload.py), the allocator default, and all memory features together.

    PYTHONPATH=src python -m pytest -q tests/test_offload.py
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref

import peft
import pytest
import torch

import longseq
from longseq.config import MemoryConfig
from longseq.memory import apply_checkpoint_offload, apply_memory, configure_allocator, lm_head_cross_entropy_sum
from longseq.memory import offload_stats
from longseq.memory.offload import _Offloaded
from longseq.parallel import ring as ring_module
from tests.models import assert_grads_equal, batch, shifted_labels, tiny_model
from tests.test_ulysses import compare

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
    original_take = _Offloaded.take

    def take(self, stats):
        alive_at_take.append(sum(ref() is not None for ref in taken))
        restored = original_take(self, stats)
        taken.append(weakref.ref(restored))
        return restored

    monkeypatch.setattr(_Offloaded, "take", take)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    assert alive_at_take == [0, 0, 0, 0]


def test_small_shared_and_parameter_tensors_stay_on_device():
    model = apply_checkpoint_offload(tiny_model(), MemoryConfig())  # 1 MiB threshold: nothing this small moves
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    stats = offload_stats(model)
    assert stats.peak_bytes == 0 and stats.offloaded_tensors == 0

    offloader = model._longseq_offloader
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
    assert not offloader._should_offload(torch.arange(1000))  # integer tensors (indices) stay


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


def _everything(model, ids):
    hidden = model.get_base_model().model(ids).last_hidden_state if hasattr(model, "get_base_model") \
        else model.model(ids).last_hidden_state
    total, count = lm_head_cross_entropy_sum(model, hidden, shifted_labels(ids))
    return total / count


def _check_everything(reference, model, ids):
    """Loss and every gradient of the fully featured model equal the plain transformers model's."""
    want = reference(ids, labels=ids).loss
    got = _everything(model, ids)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    assert_grads_equal(reference, model)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_all_features_together(family):
    reference = tiny_model(family, num_hidden_layers=LAYERS, tie_word_embeddings=True)
    config = MemoryConfig(tile_tokens=40, keep_last_layers_on_gpu=1, offload_min_bytes=0, expandable_segments=False)
    model = apply_memory(copy.deepcopy(reference), config)
    assert model._longseq_memory is config
    _check_everything(reference, model, _ids(1, 301))
    assert offload_stats(model).peak_bytes > 0 and offload_stats(model).current_bytes == 0


def test_all_features_together_with_lora():
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    reference = peft.get_peft_model(tiny_model(num_hidden_layers=LAYERS), lora)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    config = MemoryConfig(tile_tokens=40, offload_min_bytes=0, expandable_segments=False)
    model = apply_memory(copy.deepcopy(reference), config)
    _check_everything(reference, model, _ids(2, 201))
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
    assert "forward" not in vars(model.model.layers[0].mlp) and not hasattr(model, "_longseq_offloader")


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


def _step_counting_kernel_calls(model, data, mesh, monkeypatch) -> tuple[int, int]:
    """Attention kernel calls (longseq's block kernels or transformers' SDPA) of one training step's forward, and of
    its backward (recompute included)."""
    calls = []
    kernels = [(ring_module, "block_forward"), (torch.nn.functional, "scaled_dot_product_attention")]
    with monkeypatch.context() as patch:
        for module, name in kernels:
            real = getattr(module, name)
            patch.setattr(module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
        loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
        forward = len(calls)
        loss.backward()
    return forward, len(calls) - forward


@pytest.mark.parametrize("keep", [0, 1])
def test_attention_output_cache_skips_recompute(keep, monkeypatch):
    """One GPU with every memory feature: longseq's attention keeps each layer's output and log-sum-exp beside the
    checkpoint, so backward runs no attention kernel (without the cache it reruns them all). Results stay exact, with
    packed documents, and the host holds one more (out, lse) pair per offloaded layer."""
    mesh, data = longseq.Mesh(), batch(130, rows=2, documents=[1, 50, 33, 46])
    heads, peaks = tiny_model().config.num_attention_heads, {}
    for cache in (True, False):
        memory = MemoryConfig(cache_attention=cache, keep_last_layers_on_gpu=keep, tile_tokens=32,
                              offload_min_bytes=0, expandable_segments=False)
        model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
        forward, backward = _step_counting_kernel_calls(model, data, mesh, monkeypatch)
        assert forward > 0 and backward == (0 if cache else forward)
        peaks[cache] = offload_stats(model).peak_bytes
        compare(tiny_model(num_hidden_layers=LAYERS), data, mesh, memory=memory)
    pair = 2 * 130 * (H + heads) * 4  # fp32 output (B, S, heads · head_dim = H) and log-sum-exp (B, heads, S)
    assert peaks[True] - peaks[False] == (LAYERS - keep) * pair


def test_attention_output_cache_survives_a_retained_graph():
    """backward(retain_graph=True) twice recomputes twice; both replay the kept outputs and add equal gradients.
    (The tiled loss forms its gradients in forward and hands them out once, so it is off here.)"""
    mesh, data = longseq.Mesh(), batch(64, rows=2)
    memory = MemoryConfig(offload_min_bytes=0, tiled_loss=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], msg=lambda m: f"{name}: {m}")


def test_padding_mask_refused_where_longseq_attention_runs():
    model = longseq.apply(tiny_model(), longseq.Mesh(), MemoryConfig())
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=mask)
    model(ids, attention_mask=torch.ones_like(ids))  # no padding: fine


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
    pair = per_layer + 2 * 96 * tiny_model().config.num_attention_heads * 4  # output (as the input) + fp32 lse
    memory = MemoryConfig(host_memory_gib=(LAYERS * per_layer + pair) / 2**30, tile_tokens=32, offload_min_bytes=0,
                          expandable_segments=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    forward, backward = _step_counting_kernel_calls(model, data, mesh, monkeypatch)
    stats = offload_stats(model)
    assert (stats.attention_not_kept, stats.checkpoints_on_device) == (LAYERS - 1, 0)
    assert backward == forward // LAYERS * (LAYERS - 1)
    assert stats.peak_bytes == LAYERS * per_layer + pair


def test_automatic_host_budget(monkeypatch):
    """Without host_memory_gib: this process's share of 90% of the host, less its resident memory and what
    reserve_host_memory was told; fixed at the first offload, after which a reservation is refused."""
    from longseq.memory import offload, reserve_host_memory

    monkeypatch.setattr(offload, "_host_total", lambda: 100 << 30)
    monkeypatch.setattr(offload, "_resident_bytes", lambda: 10 << 30)
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
    monkeypatch.setattr(offload, "_host_total", lambda: None)  # no /proc/meminfo: no automatic limit
    assert offload._automatic_budget(0) is None


def test_generation_on_one_gpu_with_longseq_attention():
    """With the attention cache on one GPU, longseq's attention replaces SDPA; decoding with a KV cache still works."""
    reference = tiny_model(num_hidden_layers=LAYERS).eval()
    model = longseq.apply(copy.deepcopy(reference), longseq.Mesh(), MemoryConfig()).eval()
    assert model.config._attn_implementation.startswith("longseq_")
    prompt = _ids()[:1, :20]
    want = reference.generate(prompt, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(model.generate(prompt, max_new_tokens=5, do_sample=False), want)


def test_small_attention_outputs_stay_on_device(monkeypatch):
    """Kept attention outputs under offload_min_bytes (1 MiB by default) stay on the device, like small checkpoints."""
    mesh = longseq.Mesh()
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, MemoryConfig(expandable_segments=False))
    forward, backward = _step_counting_kernel_calls(model, batch(64, rows=2), mesh, monkeypatch)
    assert forward > 0 and backward == 0
    assert offload_stats(model).peak_bytes == 0
