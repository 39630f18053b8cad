"""`longseq train --demo` in a short mode: it launches its 2 processes itself and writes what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_short(tmp_path):
    run = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "LONGSEQ_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "longseq.cli", "train", "--demo", "--training.steps=3",
                             f"--metrics.run_dir={run}", "--metrics.progress=false"],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "step     loss" in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("longseq train: loss ") and "over steps 1–3" in summary and "(loss.png)" in summary
    documents = [json.loads(line) for line in (run / "data" / "stdlib.jsonl").read_text().splitlines()]
    assert {"json", "email", "asyncio"} <= {d["package"] for d in documents}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["tokens"] == 4096
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "checkpoints" / "step_000003" / ".metadata").exists()
    assert (run / "loss.png").stat().st_size > 0 and (run / "hf" / "model.safetensors").exists()


def test_readme_cpu_quick_start_runs(tmp_path):
    """The README's CPU quick start, as printed there, trains on 2 CPU processes."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- cpu-quick-start")[1].split("```python\n")[1].split("```")[0]
    script = tmp_path / "quickstart_cpu.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    losses = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("loss ")]
    assert len(losses) == 3 and losses[2] < losses[0], result.stdout
