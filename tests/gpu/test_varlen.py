"""Note [Variable-length blocks] on CUDA: FlashAttention's varlen kernel against one dense call per segment and an
fp32 reference (outputs, log-sum-exp and q/k/v gradients), causal document squares and full-block groups; and the
ring over NCCL in Note [Document placement] (2 GPUs).

    python -m pytest -q tests/gpu/test_varlen.py      # on a GPU machine; skipped without CUDA
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longseq.parallel import ring_plan, varlen
from longseq.parallel.head_groups import ALL_HEADS, HeadGroups
from longseq.parallel.local import causal_attention
from longseq.parallel.ring import ring_attention
from longseq.parallel.varlen import Call, Group, item_backward, item_forward

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ([1, 700, 129, 2900, 266, 100], [1500, 1, 33, 2000, 562])  # two rows of 4096 tokens


def _inputs(dtype, kv_heads: int, length: int = 4096, rows: int = 2, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(rows, 8, length, 128, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(rows, kv_heads, length, 128, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v, torch.randn(q.shape, device="cuda", dtype=dtype, generator=gen)


def _bounds(documents) -> list[list[int]]:
    return [[0, *torch.tensor(row).cumsum(0).tolist()] for row in documents]


def _attention_and_grads(q, k, v, dout, boundaries, groups=ALL_HEADS):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(None, *inputs, scale=0.088, boundaries=boundaries, groups=groups)
    out.backward(dout)
    return [out.float()] + [t.grad.float() for t in inputs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("heads_per_call", [None, 1, 2])
def test_packed_rows_varlen_matches_per_segment_and_fp32(dtype, kv_heads, heads_per_call, monkeypatch):
    """With all heads in one call, and head groups (Note [Attention head groups]): one head per call splits a GQA
    K/V head's calls."""
    q, k, v, dout = _inputs(dtype, kv_heads)
    boundaries = _bounds(DOCUMENTS)
    (run_a, run_b) = ring_plan._plan(boundaries, None, 2, 4096, 1, 0)
    assert any(isinstance(item, Group) for item in run_a.steps[0] + run_b.steps[0])
    varlen._varlen_refused.clear()
    grouped = _attention_and_grads(q, k, v, dout, boundaries, HeadGroups(heads=heads_per_call))
    assert not varlen._varlen_refused, varlen._varlen_refused
    monkeypatch.setattr(varlen, "_varlen_refused", ["per segment, for the comparison"])
    per_segment = _attention_and_grads(q, k, v, dout, boundaries)
    full = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = causal_attention(*full, scale=0.088, boundaries=boundaries)
    reference.backward(dout.float())
    expected = [reference] + [t.grad for t in full]
    for name, got, same, want in zip(("out", "dq", "dk", "dv"), grouped, per_segment, expected):
        torch.testing.assert_close(got, same, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name} vs per segment: {m}")
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2, msg=lambda m: f"{name} vs fp32: {m}")


def test_full_block_group_matches_dense_calls(monkeypatch):
    """Non-causal groups with different q and k lengths per segment (a ring step's blocks), merged results and fp32
    gradients as the ring uses them."""
    q, k, v, dout = _inputs(torch.bfloat16, 2, length=1024)
    calls = (Call(slice(0, 100), slice(0, 300), False), Call(slice(100, 612), slice(300, 400), False),
             Call(slice(612, 1024), slice(400, 1024), False))
    group, rows = Group(calls), slice(0, 2)
    varlen._varlen_refused.clear()
    grouped_fwd = list(item_forward(q, k, v, rows, group, scale=0.088, kernel="sdpa"))
    assert not varlen._varlen_refused and len(grouped_fwd) == 2  # one varlen call per row
    monkeypatch.setattr(varlen, "_varlen_refused", ["dense, for the comparison"])
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:-1], device="cuda")
    for index, o, l in item_forward(q, k, v, rows, group, scale=0.088, kernel="sdpa"):
        out[index], lse[index] = o, l  # every q row is in one segment: these are its final results
    grads = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
    for iq, ik, gq, gk, gv in item_backward(dout, q, k, v, out, lse, rows, group, scale=0.088, kernel="sdpa"):
        grads[0][iq] += gq
        grads[1][ik] += gk
        grads[2][ik] += gv
    monkeypatch.setattr(varlen, "_varlen_refused", [])
    grouped_bwd = list(item_backward(dout, q, k, v, out, lse, rows, group, scale=0.088, kernel="sdpa"))
    assert not varlen._varlen_refused
    for index, o, l in grouped_fwd:
        torch.testing.assert_close(o.float(), out[index].float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(l, lse[index], atol=1e-3, rtol=1e-3)
    for iq, ik, gq, gk, gv in grouped_bwd:
        assert gq.dtype == torch.float32
        for got, want in ((gq, grads[0][iq]), (gk, grads[1][ik]), (gv, grads[2][ik])):
            torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)


def test_ring_in_document_placement_over_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "tests.gpu.ring_placement"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ring placement ok" in run.stdout
