"""The attention output cache (memory/attention_cache.py): attention outputs kept from a checkpointed layer's forward
and replayed in its recompute, passed explicitly to the block kernels.

    PYTHONPATH=src python -m pytest -q tests/test_attention_cache.py
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

import longseq
from longseq.memory import MemoryConfig, offload_stats
from longseq.memory.attention_cache import KeptAttention
from longseq.parallel import varlen
from longseq.parallel.ring import ring_attention
from longseq.state import longseq_state
from tests.models import batch, tiny_model
from tests.test_ulysses import compare

B, S, H, LAYERS = 2, 127, 64, 3


def _ids(seed=0, length=S):
    return torch.randint(0, 256, (B, length), generator=torch.Generator().manual_seed(seed))


def _step_counting_kernel_calls(model, data, mesh, monkeypatch) -> tuple[int, int]:
    """Attention kernel calls (longseq's block kernels or transformers' SDPA) of one training step's forward, and of
    its backward (recompute included)."""
    calls = []
    kernels = [(varlen, "block_forward"), (torch.nn.functional, "scaled_dot_product_attention")]
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


@pytest.mark.parametrize("keep", [0, 1])
def test_kept_outputs_go_with_the_backward_while_the_loss_lives(keep, monkeypatch):
    """After a backward without retain_graph, no kept pair is left, host or device (keep=1: the last layer's on
    the device), while the loss and its graph are still alive (a training loop holds the loss into the next step's
    forward). ring_attention's hook on q's node stays with that graph, so it must not hold the pairs."""
    kept = []
    real_keep = KeptAttention.keep
    monkeypatch.setattr(KeptAttention, "keep", lambda self, t: kept.append(weakref.ref(self)) or real_keep(self, t))
    mesh, data = longseq.Mesh(), batch(130, rows=2, documents=[1, 50, 33, 46])
    memory = MemoryConfig(keep_last_layers_on_gpu=keep, offload_min_bytes=0, expandable_segments=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
    assert offload_stats(model).current_bytes > 0 and len(kept) == LAYERS
    loss.backward()
    assert offload_stats(model).current_bytes == 0 and [ref() for ref in kept] == [None] * LAYERS
    assert loss.grad_fn is not None


def test_padding_mask_refused_where_longseq_attention_runs():
    model = longseq.apply(tiny_model(), longseq.Mesh(), MemoryConfig())
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=mask)
    model(ids, attention_mask=torch.ones_like(ids))  # no padding: fine


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


def test_block_kernels_use_the_pair_the_cache_returns():
    """ring_attention(..., cache=) returns what the cache gives and differentiates that pair: a replay of the pair an
    identical call kept gives the same output and gradients; a pair kept for other inputs gives that pair's output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kept, boundaries = [], [[0, 24], [0, 10, 24]]

    def keep(compute):
        kept.append(compute())
        return kept[-1]

    out = ring_attention(None, q, k, v, scale=0.3, boundaries=boundaries, cache=keep)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    replayed = ring_attention(None, q, k, v, scale=0.3, boundaries=boundaries, cache=lambda compute: kept[0])
    torch.testing.assert_close(replayed, out)
    for got, want in zip(torch.autograd.grad(replayed.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(got, want)
    other = ring_attention(None, q * 2, k, v, scale=0.3, boundaries=boundaries, cache=keep)
    assert not torch.allclose(other, out)
    torch.testing.assert_close(ring_attention(None, q, k, v, scale=0.3, cache=lambda compute: kept[1]), other)


def test_a_wrong_replay_changes_the_gradients(monkeypatch):
    """The recompute's backward really uses the replayed pair: replaying a wrong log-sum-exp changes the gradients
    (so test_attention_output_cache_skips_recompute's exactness check would catch a cache that replays the wrong
    pair), and outside a checkpointed layer the model's attention cache is None."""
    mesh, data = longseq.Mesh(), batch(64, rows=2, documents=[30, 34])
    memory = MemoryConfig(offload_min_bytes=0, tiled_loss=False, expandable_segments=False)
    grads = {}
    for wrong in (False, True):
        model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
        if wrong:
            real_take = KeptAttention.take
            monkeypatch.setattr(KeptAttention, "take", lambda self: (lambda o, lse: (o, lse + 0.5))(*real_take(self)))
        longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh).backward()
        assert longseq_state(model).attention_cache is None
        grads[wrong] = model.model.layers[0].self_attn.q_proj.weight.grad
    assert not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize("on_gpu", [LAYERS, 0], ids=["pairs kept on the device", "pairs offloaded"])
def test_a_step_leaves_nothing_behind(on_gpu):
    """Note [Kept pairs hold no graph]: after a training step no tensor it made is alive (kept pairs, their
    recompute's q, k, v and norms), wherever the pairs were kept; so repeated steps have equal peaks."""
    from longseq.plan.live_bytes import LiveBytes

    mesh, data = longseq.Mesh(), batch(64, rows=2)
    memory = MemoryConfig(offload_min_bytes=0, keep_last_attention_on_gpu=on_gpu, expandable_segments=False)
    model = longseq.apply(tiny_model(num_hidden_layers=LAYERS), mesh, memory)
    local = longseq.shard_batch(data, mesh)
    longseq.causal_lm_loss(model, local, mesh).backward()  # the first step makes the host arena and the gradients
    peaks = []
    for _ in range(2):
        with LiveBytes() as live:
            longseq.causal_lm_loss(model, local, mesh).backward()
        assert live.alive() == 0
        peaks.append(live.peak)
    assert peaks[0] == peaks[1] > 0
