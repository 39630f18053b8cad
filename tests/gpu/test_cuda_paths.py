"""The CUDA and NCCL paths against unsharded fp32 references (tests/gpu/nccl_checks.py does the checking).

    python -m pytest -q tests/gpu          # on a GPU machine; skipped without CUDA

The kernel checks run in this process on one GPU; the sequence-parallel and model checks run under torchrun on 1, 2
and 4 GPUs (as many as the machine has), one launch per world size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def failures(results: list[dict]) -> list[str]:
    return [f"{r['check']}: error {r['error']:.3e} > {r['tolerance']:.1e} {r.get('failure', '')}" for r in results
            if not r["ok"]]


def test_block_kernels_match_fp32_sdpa():
    from tests.gpu.nccl_checks import check_kernels

    results: list[dict] = []
    check_kernels(results)
    assert results and not failures(results), failures(results)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sequence_parallel_over_nccl_matches_unsharded(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    out = tmp_path / "checks.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(world), "-m", "tests.gpu.nccl_checks", "--results", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results and not failures(results), failures(results)


@pytest.mark.parametrize("window", [None, 128, 700])
def test_windows_and_sinks_on_cuda_kernels(window):
    """Sliding windows (bands) and attention sinks on the CUDA block kernels, bf16, packed documents, GQA, one GPU,
    against fp32 attention with an explicit mask and the sink as one more column (Note [Attention sinks])."""
    from longseq.parallel.ring import ring_attention

    torch.manual_seed(0)
    length, starts = 2048, [0, 300, 301, 2048]
    q, dout = (torch.randn(1, 8, length, 64, device="cuda") for _ in range(2))
    k, v = (torch.randn(1, 2, length, 64, device="cuda") for _ in range(2))
    sinks = torch.randn(8, device="cuda")
    full = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    doc = torch.zeros(length, dtype=torch.long, device="cuda")
    for start in starts[1:-1]:
        doc[start:] += 1
    pos = torch.arange(length, device="cuda")
    distance = pos[:, None] - pos[None, :]
    allowed = (distance >= 0) & (doc[:, None] == doc[None, :]) & (distance < (window or length))
    scores = full[0] @ full[1].repeat_interleave(4, 1).transpose(-1, -2) * 0.125
    scores = torch.cat([scores.masked_fill(~allowed, float("-inf")), full[3].view(1, 8, 1, 1).expand(1, 8, length, 1)],
                       dim=-1)
    ref = scores.softmax(-1)[..., :length] @ full[2].repeat_interleave(4, 1)
    ref.backward(dout)
    local = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)] + [sinks.detach().clone().requires_grad_()]
    out = ring_attention(None, *local[:3], scale=0.125, boundaries=[starts], window=window, sinks=local[3])
    out.backward(dout.bfloat16())
    errors = [(out.float() - ref).abs().max().item()]
    errors += [((a.grad.float() - b.grad).abs().max() / b.grad.abs().max()).item() for a, b in zip(local, full)]
    assert max(errors) < 5e-2, errors
