"""The lean rotary embedding (memory/rotary.py, Note [Lean rotary backward]) against transformers' own: bitwise.

    PYTHONPATH=src python -m pytest -q tests/test_rotary.py
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from transformers.models.llama import modeling_llama

from longseq.plan.live_bytes import LiveBytes
from longseq.memory import MemoryConfig, apply_memory, rotary
from longseq.memory.rotary import install_lean_rotary, lean_apply_rotary_pos_emb, lean_rotary
from tests.models import assert_grads_equal, batch, tiny_model

HF_ROTARY = rotary._installed.get(modeling_llama.__name__, modeling_llama.apply_rotary_pos_emb)


@pytest.fixture
def untouched(monkeypatch):
    """Each test starts with transformers' own functions in its modules and nothing checked; restored after it."""
    for name, original in rotary._installed.items():
        monkeypatch.setattr(sys.modules[name], "apply_rotary_pos_emb", original)
    monkeypatch.setattr(rotary, "_installed", {})
    monkeypatch.setattr(rotary, "_checked", {})
    return monkeypatch


def _inputs(dtype, rows=2, heads=4, kv_heads=2, length=37, dim=16, seed=0):
    """q and k as in the models: transposed views of batch × length × heads × dim."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, length, heads, dim, generator=g).transpose(1, 2)
    k = torch.randn(rows, length, kv_heads, dim, generator=g).transpose(1, 2)
    angles = torch.randn(rows, length, dim // 2, generator=g) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    grads = torch.randn_like(q), torch.randn_like(k)
    return [t.to(dtype) for t in (q, k, cos, sin, *grads)]


def _run(fn, q, k, cos, sin, dq_out, dk_out):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    outputs = fn(q, k, cos, sin)
    torch.autograd.backward(outputs, (dq_out, dk_out))
    return [*outputs, q.grad, k.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_positions", [1, 5, 37, 1000])
def test_bitwise_equal_to_transformers(dtype, chunk_positions):
    """Batch 2, 37 positions (odd, not a multiple of 5), GQA: 4 query heads, 2 K/V heads."""
    q, k, cos, sin, dq_out, dk_out = _inputs(dtype)
    chunk = chunk_positions * 2 * 4 * 8 * q.element_size()  # positions of q's half width

    def lean(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return lean_rotary(q, cos, sin, chunk), lean_rotary(k, cos, sin, chunk)

    want = _run(HF_ROTARY, q, k, cos, sin, dq_out, dk_out)
    got = _run(lean, q, k, cos, sin, dq_out, dk_out)
    for name, a, b in zip(("q_embed", "k_embed", "dq", "dk"), got, want):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), name
    assert all(a.stride() == b.stride() for a, b in zip(got, want))


def test_layout_unsqueeze_dim_2_and_fallbacks():
    """unsqueeze_dim=2 (q as batch × length × heads × dim); partial-width cos, cos needing a gradient and no grad
    mode go to the original function."""
    q, k, cos, sin, dq_out, dk_out = _inputs(torch.float32)
    q, k, dq_out, dk_out = (t.transpose(1, 2) for t in (q, k, dq_out, dk_out))
    lean = lean_apply_rotary_pos_emb(HF_ROTARY)

    def run(fn):
        return _run(lambda *a: fn(*a, unsqueeze_dim=2), q, k, cos, sin, dq_out, dk_out)

    assert all(torch.equal(a, b) for a, b in zip(run(lean), run(HF_ROTARY)))
    calls = []
    spy = lean_apply_rotary_pos_emb(lambda *a, **kw: calls.append(a) or (a[0], a[1]))
    spy(q, k, cos[..., :8], sin[..., :8])
    spy(q, k, cos.clone().requires_grad_(), sin)
    spy(q, k, cos.double(), sin.double())
    assert len(calls) == 3


def test_forward_and_backward_hold_one_tensor_of_q_size_not_three():
    """Peak bytes allocated during the rotation of q and during its backward (plan/live_bytes.py): autograd's about
    3 × q's size in each, the lean one q's size and a chunk."""
    q, _, cos, sin, dq_out, _ = _inputs(torch.float32, heads=8, length=1001, dim=64)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    chunk = 64 * 2 * 8 * 32 * 4  # 64 positions of q's half

    def peaks(fn) -> tuple[int, int]:
        x = q.contiguous().requires_grad_()  # as its gradient is: no copy into the leaf's layout
        with LiveBytes() as forward:
            out = fn(x)
        with LiveBytes() as backward:
            out.backward(dq_out)
        return forward.peak, backward.peak

    size = q.numel() * q.element_size()
    hf = peaks(lambda x: x * cos + modeling_llama.rotate_half(x) * sin)
    lean = peaks(lambda x: lean_rotary(x, cos, sin, chunk))
    assert min(hf) >= 3 * size
    assert all(size <= peak <= size + chunk + 4096 for peak in lean), lean


def test_installed_for_the_standard_families_once(untouched):
    names = []
    for family in ("llama", "qwen3", "gemma3", "qwen3_moe"):
        names = install_lean_rotary(tiny_model(family))
    assert names == sorted(f"transformers.models.{f}.modeling_{f}" for f in ("gemma3", "llama", "qwen3", "qwen3_moe"))
    first = modeling_llama.apply_rotary_pos_emb
    assert first is not HF_ROTARY and rotary._installed["transformers.models.llama.modeling_llama"] is HF_ROTARY
    install_lean_rotary(tiny_model("llama"))
    assert modeling_llama.apply_rotary_pos_emb is first


def test_a_family_whose_rotary_differs_is_left_alone(untouched):
    """A modeling module whose apply_rotary_pos_emb rotates interleaved pairs (GLM's form), and one whose signature
    differs: neither is replaced."""

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rotate(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def with_positions(q, k, cos, sin, position_ids, unsqueeze_dim=1):
        return HF_ROTARY(q, k, cos, sin, unsqueeze_dim)

    for name, function in (("interleaved", interleaved), ("positions", with_positions)):
        module = types.ModuleType(f"fake_modeling_{name}")
        module.apply_rotary_pos_emb = function
        attention = type("Attention", (torch.nn.Module,), {
            "__module__": module.__name__,
            "forward": lambda self, q, k, cos, sin: apply_rotary_pos_emb(q, k, cos, sin)})  # noqa: F821
        untouched.setitem(sys.modules, module.__name__, module)
        assert install_lean_rotary(torch.nn.Sequential(attention())) == []
        assert module.apply_rotary_pos_emb is function and rotary._checked[module.__name__] is False


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_whole_model_with_memory_features_equals_transformers(untouched, family):
    """Loss and every gradient of a tiny model under apply_memory (all features, the lean rotary with chunks of 7
    positions) equal the untouched transformers model's, computed before installation."""
    reference = tiny_model(family, num_hidden_layers=3)
    ids = batch(101, rows=2)["input_ids"]
    want = reference(ids, labels=ids).loss
    want.backward()
    untouched.setattr(rotary, "_CHUNK_BYTES", 7 * 2 * 4 * 8 * 4)
    config = MemoryConfig(tile_tokens=40, offload_min_bytes=0, expandable_segments=False)
    model = apply_memory(copy.deepcopy(reference), config)
    assert rotary._checked[f"transformers.models.{family}.modeling_{family}"]
    got = model(ids, labels=ids).loss
    got.backward()
    torch.testing.assert_close(got, want)
    assert_grads_equal(reference, model)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_with_the_lean_rotary_alone_is_bitwise_transformers(untouched, family, dtype):
    """Only the rotary installed (chunks of 7 positions): loss and every gradient bitwise the untouched model's."""
    reference = tiny_model(family, num_hidden_layers=2).to(dtype)
    ids = batch(61, rows=2)["input_ids"]
    want = reference(ids, labels=ids).loss
    want.backward()
    model = copy.deepcopy(reference)
    model.zero_grad(set_to_none=True)
    untouched.setattr(rotary, "_CHUNK_BYTES", 7 * 2 * 4 * 8 * 4)
    assert install_lean_rotary(model) == [f"transformers.models.{family}.modeling_{family}"]
    got = model(ids, labels=ids).loss
    got.backward()
    assert torch.equal(got, want)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_bench_rotary_runs_on_cpu():
    from bench.bench_rotary import measure

    row = measure(33, "cpu", repeats=1)
    assert row["bitwise_equal"] and row["lean_backward_extra_q"] is None and row["lean_ms"] > 0
