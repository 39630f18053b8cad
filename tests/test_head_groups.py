"""Attention kernel calls over groups of heads (parallel/head_groups.py, Note [Attention head groups]) and the block
kernels on strided inputs: every grouping gives the gradients of one call over all heads.

    PYTHONPATH=src python -m pytest -q tests/test_head_groups.py
"""

from __future__ import annotations

import pytest
import torch

import longseq
from longseq.plan.live_bytes import LiveBytes
from longseq.memory import MemoryConfig
from longseq.parallel import varlen
from longseq.parallel.head_groups import HeadGroups
from longseq.parallel.kernels import block_backward, block_forward
from longseq.parallel.sizes import allowed_sizes
from tests.models import batch, tiny_model
from tests.test_ulysses import compare


def _bshd(heads: int, length: int, generator, dtype=torch.float64) -> torch.Tensor:
    """(B, heads, length, D) seen through the (B, length, heads, D) layout HF's projections give."""
    return torch.randn(2, length, heads, 16, generator=generator, dtype=dtype).transpose(1, 2)


def test_allowed_sizes_and_the_memory_target():
    assert allowed_sizes(32, 8) == [1, 2, 4, 8, 16, 32]
    assert allowed_sizes(6, 2) == [1, 3, 6]
    assert allowed_sizes(4, 4) == [1, 2, 4]
    q = torch.empty(1, 32, 65536, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, 65536, 128, dtype=torch.bfloat16, device="meta")
    per_head = 65536 * 128 * (5 * 2 + 4)  # bytes of one head's backward buffers
    assert HeadGroups(memory_mib=1024).size(q, k) == 8  # 1 GiB / per_head = 9.1 → 8 heads (2 K/V heads)
    assert HeadGroups(memory_mib=per_head * 3 // 2**20).size(q, k) == 2
    assert HeadGroups(memory_mib=1).size(q, k) == 1
    assert HeadGroups(heads=7).size(q, k) == 4  # rounded down to an allowed size
    assert HeadGroups().size(q, k) == 32


@pytest.mark.parametrize("causal,lengths", [(True, (33, 33)), (False, (20, 33))])
def test_every_grouping_gives_the_one_call_gradients(causal, lengths):
    """fp64, GQA (8 query heads, 2 K/V heads), inputs in HF's strided layout: 1, 2, 4 and 8 heads per call give the
    output, log-sum-exp and q/k/v gradients of one call over all heads, and the gradients keep q/k/v's layout."""
    g = torch.Generator().manual_seed(0)
    lq, lk = lengths
    q, dout, k, v = _bshd(8, lq, g), _bshd(8, lq, g), _bshd(2, lk, g), _bshd(2, lk, g)
    out, lse = block_forward(q, k, v, causal=causal, scale=0.3)
    grads = block_backward(dout, q, k, v, out, lse, causal=causal, scale=0.3)
    for heads in (1, 2, 4, 8):
        groups = HeadGroups(heads=heads)
        assert len(groups.calls(q, k)) == 8 // heads
        got_out, got_lse = block_forward(q, k, v, causal=causal, scale=0.3, groups=groups)
        torch.testing.assert_close(got_out, out, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_lse, lse, rtol=0, atol=1e-12)
        got = block_backward(dout, q, k, v, out, lse, causal=causal, scale=0.3, groups=groups)
        for g_got, g_want in zip(got, grads):
            torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)
        if heads < 8:
            assert [t.stride() for t in got] == [t.stride() for t in (q, k, v)]


def test_half_precision_groups_round_each_kv_gradient_once():
    """bf16 with fp32 accumulation: a K/V head split over calls sums in fp32 and is rounded once, like one call."""
    g = torch.Generator().manual_seed(1)
    q, dout, k, v = (_bshd(h, 40, g, torch.bfloat16) for h in (8, 8, 2, 2))
    out, lse = block_forward(q, k, v, causal=True, scale=0.25)
    want = block_backward(dout, q, k, v, out, lse, causal=True, scale=0.25, grad_dtype=torch.bfloat16)
    got = block_backward(dout, q, k, v, out, lse, causal=True, scale=0.25, grad_dtype=torch.bfloat16,
                         groups=HeadGroups(heads=1))
    for g_got, g_want in zip(got, want):
        assert g_got.dtype == torch.bfloat16
        torch.testing.assert_close(g_got, g_want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16])
def test_head_groups_allocate_their_results_and_one_calls_buffers(grad_dtype):
    """What forward + backward over 4-head groups allocates at its peak (tensors, kernel workspace excluded: bench/
    live_bytes.py) is exactly what it returns (out, lse, dq, dk, dv; fp32 gradients by default, a ring block's) plus
    one call's expanded K/V, dq, dk, dv and dense lse: no whole-tensor copy of q, dout, out or lse, no buffer of all heads
    beyond the results. tests/gpu/test_memory_gpu.py checks the same on CUDA with the kernels' workspace."""
    g = torch.Generator().manual_seed(3)
    q, dout, k, v = (_bshd(h, 64, g, torch.bfloat16) for h in (32, 32, 8, 8))
    head = q[:, :1].nbytes  # one head's (B, 64, 16) in bf16
    with LiveBytes() as live:
        out, lse = block_forward(q, k, v, causal=True, scale=0.25, groups=HeadGroups(heads=4))
        results = (out, lse, *block_backward(dout, q, k, v, out, lse, causal=True, scale=0.25, grad_dtype=grad_dtype,
                                             groups=HeadGroups(heads=4)))
    assert results[2].dtype == (grad_dtype or torch.float32)
    call = 4 * head * (2 + 3) + lse[:, :4].nbytes  # expanded k, v; the call's dq, dk, dv; its lse made dense
    assert live.peak == sum(t.nbytes for t in results) + call


def test_strided_inputs_equal_dense_copies():
    """The block kernels take HF's (B, S, H, D)-strided tensors and slices of them without copies, with the result of
    dense copies (the CPU op reads strides; the CUDA ops are checked in tests/gpu/test_memory_gpu.py)."""
    g = torch.Generator().manual_seed(2)
    q, dout, k, v = _bshd(4, 30, g), _bshd(4, 30, g), _bshd(2, 30, g), _bshd(2, 30, g)
    rows = (slice(None), slice(None), slice(5, 25))
    strided = [t[rows] for t in (q, k, v, dout)]
    dense = [t.contiguous() for t in strided]
    for inputs in (strided, dense):
        assert inputs[0].is_contiguous() == (inputs is dense)
    results = []
    for sq, sk, sv, sd in (strided, dense):
        out, lse = block_forward(sq, sk, sv, causal=True, scale=0.3)
        results.append((out, lse, *block_backward(sd, sq, sk, sv, out, lse, causal=True, scale=0.3)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_model_with_one_head_per_call_equals_plain(monkeypatch):
    """A model's attention with one head per kernel call (and with the default memory target): loss, logits and every
    gradient equal the plain transformers model, packed documents, GQA; and the calls really were per head."""
    mesh, data = longseq.Mesh(), batch(130, rows=2, documents=[1, 50, 33, 46])
    calls = []
    real = varlen.block_backward
    monkeypatch.setattr(varlen, "block_backward",
                        lambda *a, groups, **k: calls.append(groups.size(a[1], a[2])) or real(*a, groups=groups, **k))
    for memory in (MemoryConfig(attention_heads_per_call=1, tile_tokens=32, offload_min_bytes=0),
                   MemoryConfig(offload_min_bytes=0)):
        calls.clear()
        compare(tiny_model(num_hidden_layers=3), data, mesh, memory=memory)
        assert calls and set(calls) == {1 if memory.attention_heads_per_call else 4}
