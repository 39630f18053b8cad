"""bench/calibrate.py and bench/bench_plan.py end to end on CPU at tiny sizes (what the GPU runs do, smaller).

    PYTHONPATH=src python -m pytest -q tests/test_plan_bench.py
"""

from __future__ import annotations

import json

import pytest

from bench import bench_plan, calibrate
from longseq.plan.card import load_card


GEMM_TFLOPS, ROW_GELEMENTS_S = 0.02, 0.5
"""Speeds the expert blocks' times are replaced with in the end-to-end runs: two timings on a shared 2-core machine
can solve to a negative speed (the solve is checked on its own below)."""


@pytest.fixture
def expert_times_from_known_speeds(monkeypatch):
    """The blocks are built and timed as on a GPU; their seconds are then those of GEMM_TFLOPS and ROW_GELEMENTS_S."""
    measured = calibrate.expert_block_times

    def known(*args):
        return [(f, n, f / (GEMM_TFLOPS * 1e12) + n / (ROW_GELEMENTS_S * 1e9)) for f, n, _ in measured(*args)]

    monkeypatch.setattr(calibrate, "expert_block_times", known)


def test_expert_speeds_solve_from_two_blocks():
    rows = [(4e12, 1e9, 4e12 / 5e14 + 1e9 / 6e11), (9e12, 5e8, 9e12 / 5e14 + 5e8 / 6e11)]
    speeds = calibrate.solve_expert_speeds(rows)
    assert speeds == pytest.approx({"expert_gemm_tflops": 500, "expert_row_gelements_s": 600})
    with pytest.raises(RuntimeError, match="non-positive speed.*another job on the device"):
        calibrate.solve_expert_speeds([(4e12, 1e9, 1.0), (9e12, 5e8, 0.1)])


def test_calibrate_writes_a_card_that_loads(tmp_path, capsys, expert_times_from_known_speeds):
    path = tmp_path / "cpu.json"
    calibrate.main(["--device", "cpu", "--out", str(path)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    card, stored = load_card(str(path)), load_card("cpu")
    assert record["card_file"] == str(path) and card.attention_tflops(16)[0] > 0 and card.gemm_tflops > 0
    assert card.sources["gemm_tflops"].startswith("measured: bench/calibrate.py")
    assert card.expert_gemm_tflops > 0 and card.expert_row_gelements_s > 0 and card.band_tflops > 0
    # The memory facts the tests' card states are what the CPU kernels do.
    for fact in ("attention_lse_dense", "sdpa_gqa_expands_kv_grads"):
        assert getattr(card, fact) == getattr(stored, fact), fact


def test_calibrate_only_the_expert_and_band_speeds(tmp_path, capsys, expert_times_from_known_speeds):
    """--only measures the named figures at tiny sizes (an expert block's grouped GEMMs and routed rows, solved from
    a small and a large expert; the bands) and keeps the stored card's other figures and their sources."""
    path = tmp_path / "cpu.json"
    calibrate.main(["--device", "cpu", "--out", str(path), "--only", "experts", "band"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(record["values"]) == {"expert_gemm_tflops", "expert_row_gelements_s", "band_tflops"}
    card, stored = load_card(str(path)), load_card("cpu")
    for field in record["values"]:
        assert getattr(card, field) == record["values"][field] > 0
        assert card.sources[field].startswith("measured: bench/calibrate.py --only experts band, cpu"), field
    assert card.expert_gemm_tflops == pytest.approx(GEMM_TFLOPS)
    assert card.expert_row_gelements_s == pytest.approx(ROW_GELEMENTS_S)
    assert card.gemm_tflops == stored.gemm_tflops and card.sources["gemm_tflops"] == stored.sources["gemm_tflops"]


def test_bench_plan_runs_in_fresh_processes(monkeypatch, capsys):
    # The record is printed, not appended to bench/results/.
    monkeypatch.setattr("bench.common.write_record", lambda name, record: print(json.dumps(record)))
    bench_plan.main(["--device", "cpu", "--configs", "nocache-128k"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {row["config"]: row for row in record["rows"]}
    assert set(rows) == {"nocache-128k"}
    for row in rows.values():
        assert row["plan_fits"] and not row["measured"]["oom"]
        assert abs(row["predicted"]["gpu_gib"] / row["measured"]["gpu_gib"] - 1) < 0.02
        assert row["predicted"]["host_gib"] == row["measured"]["host_gib"]
    assert abs(record["summary"]["gpu_gib_worst_error"]) < 0.02


def _bench_rows(monkeypatch, capsys, argv: list[str]) -> dict:
    monkeypatch.setattr("bench.common.write_record", lambda name, record: print(json.dumps(record)))
    bench_plan.main(argv)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return {(row["config"], row["length"]): row for row in record["rows"]}


def test_bench_plan_lora_freezes_the_base_weights(monkeypatch, capsys):
    rows = _bench_rows(monkeypatch, capsys, ["--device", "cpu", "--configs", "plan-32k", "--training", "lora"])
    row = rows["plan-32k", 2048]
    assert row["training"] == "lora" and row["plan_fits"] and not row["measured"]["oom"]
    assert row["predicted"]["host_gib"] == row["measured"]["host_gib"]
    # Frozen weights: no weight gradients, and the plan (planned as 'lora', with adapters the run lacks) is not
    # below what the run held.
    predicted = row["predicted"]["gpu_gib"] - row["predicted"]["adapters_gib"]
    assert 1.0 <= predicted / row["measured"]["gpu_gib"] < 1.3


def test_bench_plan_auto_runs_what_the_plan_chose(monkeypatch, capsys):
    rows = _bench_rows(monkeypatch, capsys, ["--device", "cpu", "--configs", "auto", "--lengths", "1024", "2048"])
    assert set(rows) == {("auto", 1024), ("auto", 2048)}
    for row in rows.values():
        assert row["plan_fits"] and not row["measured"]["oom"]
        assert row["measured"]["memory_in_use"] == row["plan_memory"]
    assert rows["auto", 1024]["plan_memory"] != rows["auto", 2048]["plan_memory"]  # the plan differs per length
    auto = rows["auto", 2048]  # checkpoints offloaded: the plan's peak as exact as in the configurations above
    assert abs(auto["predicted"]["gpu_gib"] / auto["measured"]["gpu_gib"] - 1) < 0.02


def test_bench_plan_runs_a_mixture_of_experts_config(monkeypatch, capsys, tmp_path):
    """--model: the plan's choice for a tiny Qwen3-MoE config.json runs, within 5% of the prediction."""
    from tests.models import tiny_model

    tiny_model("qwen3_moe").config.save_pretrained(tmp_path)
    rows = _bench_rows(monkeypatch, capsys, ["--device", "cpu", "--model", str(tmp_path), "--configs", "default-128k"])
    row = rows["default-128k", 4096]
    assert row["shape"] == str(tmp_path) and row["plan_fits"] and not row["measured"]["oom"]
    assert abs(row["predicted"]["gpu_gib"] / row["measured"]["gpu_gib"] - 1) < 0.05
    assert row["predicted"]["host_gib"] == row["measured"]["host_gib"]
