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
