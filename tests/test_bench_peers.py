"""bench/run_peers.py end to end on CPU at a tiny size: the driver's calibration, hf and longseq stepping the same
tokens to the same loss, hf-offload saying why it cannot run here; the placement ladder and longseq's memory options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peers_contenders import longseq_memory, longseq_unavailable, memory_fields
from bench.peers_driver import Driver, driver_parser
from bench.peers_records import ContenderUnavailable
from bench.peers_registry import prepare

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = ("first_step_loss", "step_s", "step_s_min", "peak_gib", "host_peak_gib", "tokens_per_s_per_gpu",
              "tflops_per_gpu", "ideal_step_s", "ideal_attention_s", "ideal_dense_s", "attention_tflops",
              "gemm_tflops", "pct_of_ideal", "settings", "card", "torch", "transformers")


def drive(results, *args: str) -> subprocess.CompletedProcess:
    """`bench.run_peers drive` on CPU at the tiny shape and 64 tokens, its records in `results`."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "bench.run_peers", "drive", "--device", "cpu", "--cpus", "1",
                          "--shape", "tiny", "--lengths", "64", "--code", "test", "--call", "0",
                          "--results", str(results), "--timeout", "240", "--budget", "600", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def test_run_peers_on_cpu_records_every_field_and_losses_agree(tmp_path):
    results = tmp_path / "peers.jsonl"
    run = drive(results, "--gpus", "2", "--jobs", "2", "--timed", "2", "--contenders", "hf", "hf-offload", "longseq")
    assert json.loads(run.stdout.strip().splitlines()[-1])["bench"] == "peers"
    records = {r["contender"]: r for r in map(json.loads, results.read_text().splitlines())}
    for name in ("hf", "longseq"):
        r = records[name]
        assert r["status"] == "ok", r
        assert [f for f in RUN_FIELDS if r.get(f) is None] == []
        assert r["placement"] == "gpu" and r["placements_tried"] == ["gpu"] and r["optimizer"] == "adamw"
        assert r["code"] == "test" and r["device_call"] == 0 and r["step_repeats"] == 2
        assert r["step_s_min"] <= r["step_s"] and 0 < r["pct_of_ideal"] and r["ideal_step_s"] > 0
    assert abs(records["hf"]["first_step_loss"] - records["longseq"]["first_step_loss"]) < 2e-3
    offload = records["hf-offload"]
    if offload["status"] == "ok":  # a machine with CUDA and Liger
        assert abs(offload["first_step_loss"] - records["hf"]["first_step_loss"]) < 2e-3
    else:
        assert offload["status"] == "unavailable" and "hf-offload cannot run here" in offload["error"]


def test_run_peers_longseq_auto_records_the_config_it_chose(tmp_path):
    results = tmp_path / "peers.jsonl"
    drive(results, "--gpus", "1", "--jobs", "1", "--timed", "1", "--contenders", "longseq", "--memory", "auto")
    (record,) = map(json.loads, results.read_text().splitlines())
    assert record["status"] == "ok", record
    chosen = record["memory_in_use"]  # 64 tokens: the plan switches checkpointing and the norms' tiling off
    assert not chosen["offload_checkpoints"] and not chosen["tiled_norms"]
    assert record["settings"]["memory"].startswith("auto")


def test_driver_offloads_only_after_an_out_of_memory(monkeypatch):
    monkeypatch.setattr(Driver, "_calibrate", lambda self: (None, "not in this test"))
    monkeypatch.setattr("bench.peers_driver.unavailable", lambda name, args: [])  # as on a GPU machine with DeepSpeed
    driver = Driver(driver_parser().parse_args(["--device", "cpu", "--contenders", "alst", "--lengths", "1", "2"]))
    outcome = {("gpu", 1): "oom", ("optimizer", 1): "ok", ("optimizer", 2): "oom", ("all", 2): "ok"}
    monkeypatch.setattr(driver, "run_once", lambda contender, length, timed, placement, timeout: dict(
        contender=contender, length=length, placement=placement, status=outcome[placement, length]))
    first = driver.run("alst", 1, timed=1)
    assert first["status"] == "ok" and first["placement"] == "optimizer" and first["placements_tried"] == ["gpu",
                                                                                                          "optimizer"]
    second = driver.run("alst", 2, timed=1)  # a longer length starts where the shorter one fitted
    assert second["placement"] == "all" and second["placements_tried"] == ["optimizer", "all"]
    assert [(r["placement"], r["status"]) for r in driver.records] == [("gpu", "oom"), ("optimizer", "oom")]


def test_longseq_memory_options(monkeypatch):
    import longseq

    assert memory_fields(["cache_attention=false", "tile_tokens=4096", "host_memory_gib=null"]) == dict(
        cache_attention=False, tile_tokens=4096, host_memory_gib=None)
    with pytest.raises(ValueError, match="tiled_mlps=false.*NAME one of"):
        memory_fields(["tiled_mlps=false"])
    args = driver_parser().parse_args(["--memory-field", "tiled_mlp=false"])
    assert longseq_memory(args, {}) == longseq.MemoryConfig(tiled_mlp=False)
    auto = driver_parser().parse_args(["--memory", "auto", "--memory-field", "tiled_loss=false"])
    chosen = longseq_memory(auto, {"cache_attention": False})
    assert isinstance(chosen, longseq.AutoMemory) and chosen.training == "full" and not chosen.fsdp_cpu_offload
    assert chosen.overrides == dict(tiled_loss=False, cache_attention=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert "planner" in longseq_unavailable(auto)[0] and longseq_unavailable(args) == []
    with pytest.raises(ContenderUnavailable, match="longseq cannot run here: --memory auto needs"):
        prepare("longseq", auto)
