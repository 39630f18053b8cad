"""bench/bench_packed.py end to end on CPU at tiny size (one process and a ring of two), and its document mix."""

from __future__ import annotations

import math

import pytest

import bench.bench_packed as bench_packed
from tests.distributed import run_distributed

TINY_RUN = ["--shape", "tiny", "--length", "256", "--shortest", "8", "--longest", "256", "--rows", "2",
            "--repeats", "1"]


def test_document_mix_fills_rows_with_log_uniform_pieces():
    mix = bench_packed.document_mix(rows=50, length=4096, shortest=16, longest=4096, seed=3)
    assert len(mix) == 50 and all(sum(row) == 4096 and min(row) >= 1 for row in mix)
    assert mix == bench_packed.document_mix(rows=50, length=4096, shortest=16, longest=4096, seed=3)
    described = bench_packed.describe(mix)
    assert math.isclose(sum(described["token_share"].values()), 1.0)
    assert math.isclose(sum(described["attention_share"].values()), 1.0)
    assert 1 < described["documents_per_row"] < 20
    assert 0 < described["attention_vs_one_document"] < 1


@pytest.fixture
def records(monkeypatch):
    written = []
    monkeypatch.setattr(bench_packed, "write_record", lambda name, record: written.append((name, record)))
    return written


def test_model_step_on_cpu_eager_and_compiled(records):
    record = bench_packed.main(TINY_RUN + ["--compile", "aot_eager"])
    assert records == [("bench_packed", record)]
    result = record["results"]["single"]
    assert math.isfinite(result["packed"]["loss"]) and result["packed"]["tflops_per_gpu"] > 0
    assert result["packed_compiled"]["loss"] == pytest.approx(result["packed"]["loss"], rel=1e-5)
    assert result["packed_vs_single"] > 0 and result["packed_compiled_vs_eager"] > 0
    assert record["mix"]["documents"] >= 2


def test_attention_only_on_cpu(records):
    record = bench_packed.main(TINY_RUN + ["--attention", "--dense-min", "0", "-1"])
    assert set(record["attention"]) == {"one_document", "packed_dense_min_0", "packed_dense_min_-1"}
    assert all(r["tflops"] > 0 for r in record["attention"].values())


def _ring_of_two():
    written = []
    bench_packed.write_record = lambda name, record: written.append(record)
    record = bench_packed.main(TINY_RUN + ["--layouts", "ring"])
    balance = record["results"]["ring"]["work_per_rank_max_vs_mean"]
    assert balance["documents"]["max"] <= balance["zigzag"]["max"]
    assert balance["documents"]["max"] < 1.1


def test_ring_of_two_on_cpu():
    run_distributed(_ring_of_two, 2)


def test_placement_count(records):
    record = bench_packed.main(["--length", "4096", "--shortest", "16", "--longest", "4096", "--rows", "20",
                                "--placement", "2", "4"])
    for ring in ("2", "4"):
        counted = record["placement"][ring]
        assert counted["documents"]["max"] < 1.02 < counted["zigzag"]["max"]
