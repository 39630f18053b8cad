"""bench/bench_memory.py (levers side by side) and bench/memory_snapshot.py (the CPU stand-in for the memory history)
end to end on CPU at a tiny size.

    PYTHONPATH=src:. python -m pytest -q tests/test_bench_memory.py
"""

from __future__ import annotations

import sys

from bench import bench_memory, memory_snapshot


def _run(module, argv: list[str], monkeypatch) -> list[dict]:
    records = []
    monkeypatch.setattr(module, "write_record", lambda name, record: records.append(record))
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()
    return records


def test_levers_record_gpu_host_and_time(monkeypatch, capsys):
    records = _run(bench_memory, ["--levers", "default", "k2", "--shape", "tiny", "--layers", "3", "--lengths", "128",
                                  "256", "--timed-lengths", "256", "--device", "cpu",
                                  "--memory-field", "offload_min_bytes=0"], monkeypatch)
    default, k2 = records
    assert (default["lever"], k2["lever"]) == ("default", "k2") and k2["memory"]["layers_per_checkpoint"] == 2
    for record in records:
        short, long = record["rows"]
        assert "step_s" in long and "step_s" not in short and long["offloaded_peak_gib"] > short["offloaded_peak_gib"]
        assert long["arena_gib"] <= long["host_budget_gib"] and long["host_hwm_gib"] > 0
    # 3 layers: checkpoints of layers 0, 1, 2 against 0, 2; the same three kept attention outputs
    assert 0 < k2["host_kib_per_token"] < default["host_kib_per_token"]
    assert "| k2 |" in capsys.readouterr().out


def test_snapshot_on_cpu_names_what_is_alive_at_the_peak(monkeypatch):
    (record,) = _run(memory_snapshot, ["--shape", "tiny", "--layers", "2", "--lengths", "128", "256", "--device",
                                       "cpu", "--memory", "tile_tokens=32,offload_min_bytes=0"], monkeypatch)
    short, long = record["rows"]
    assert long["peak_gib"] > short["peak_gib"] > 0 and record["peak_kib_per_token"] > 0
    assert any("memory/host_copy.py" in where for where in long["groups"])  # restored checkpoints are device memory
    assert not any("host_arena.py" in where for where in long["groups"])  # host copies are not


def test_counts_are_per_step_not_since_the_model_was_wrapped(monkeypatch):
    """With no host room every step drops the same attention outputs and keeps the same checkpoints on the device:
    the second length's record counts its own step, not both."""
    (record,) = _run(bench_memory, ["--levers", "default", "--shape", "tiny", "--layers", "3", "--lengths", "128",
                                    "256", "--device", "cpu", "--timed-steps", "0", "--memory-field",
                                    "offload_min_bytes=0", "host_memory_gib=0"], monkeypatch)
    short, long = record["rows"]
    assert short["attention_not_kept"] > 0 and short["checkpoints_on_device"] > 0
    assert (long["attention_not_kept"], long["checkpoints_on_device"]) == (short["attention_not_kept"],
                                                                           short["checkpoints_on_device"])
