"""The memory model against the code itself: live tensors of real training steps on CPU (bench/live_bytes.py).

A tiny Llama in fp32 runs forward + backward under the plan's MemoryConfig at two lengths; the live tensors' peak
grows per token exactly as the plan's terms say (kernel-internal buffers aside: the 'cpu' card counts none), and
the offloaded copies are exactly the plan's host bytes. When a change to longseq moves its memory, this test names
the configuration whose term must follow.

    PYTHONPATH=src python -m pytest -q tests/test_plan_measured.py
"""

from __future__ import annotations

import dataclasses

import pytest

from bench.bench_plan import TINY, measure
from longseq.plan.choice import Choice
from longseq.plan.footprint import footprint
from longseq.plan.planner import machine_for
from longseq.plan.problem import Layout, Problem, Workload
from tests.distributed import run_distributed

GIB = 2**30
TILED = dict(tile_memory_mib=1, attention_host_layers=TINY.layers)  # 1 MiB: 682-token MLP tiles at this width


def tiny_problem(length: int, sp: int = 1, ring: int = 1, **workload) -> Problem:
    return Problem(shape=TINY, layout=Layout(sp=sp, ring=ring),
                   workload=Workload(length=length, training="forward-backward", **workload),
                   machine=machine_for("cpu", host_memory_gib=0.05 * sp, gpus_per_host=sp), dtype_bytes=4,
                   offload_min_bytes=0)


def compare(choice: Choice, lengths=(2048, 4096), mesh=None, **problem_args) -> None:
    """Measured bytes per token between two lengths equal the model's (within 1%: the few bytes per token of the
    batch's own tensors; on several ranks, the largest rank's), and offloaded bytes equal the model's host bytes."""
    problems = [tiny_problem(n, **problem_args) for n in lengths]
    predicted = [footprint(p, choice) for p in problems]
    assert predicted[0].gpu.moment == predicted[1].gpu.moment, "the peak must be the same moment at both lengths"
    measured = [measure(p, choice, "cpu", mesh=mesh) for p in problems]
    tokens = [p.tokens for p in problems]
    slope = (measured[1]["gpu_gib"] - measured[0]["gpu_gib"]) * GIB / (tokens[1] - tokens[0])
    if mesh is not None:
        slope = _largest_over_ranks(slope)
    model = (predicted[1].gpu.bytes - predicted[0].gpu.bytes) / (tokens[1] - tokens[0])
    assert slope == pytest.approx(model, rel=0.01), f"{predicted[1].gpu.moment}: measured {slope}, model {model}"
    for usage, got in zip(predicted, measured):
        assert got["host_gib"] * GIB == usage.host_budget_bytes


@pytest.mark.parametrize("name, choice", [
    ("attention cache on the host", Choice(**TILED)),
    ("model's own SDPA, no cache", Choice(**{**TILED, "cache_attention": False})),
    ("untiled MLP and norms", Choice(**{**TILED, "tiled_mlp": False, "tiled_norms": False})),
    ("checkpoints and outputs kept on the GPU", Choice(**{**TILED, "checkpoint_gpu_layers": 2})),
    ("some attention recomputed", Choice(**{**TILED, "attention_host_layers": 1})),
])
def test_one_rank(name, choice):
    compare(choice)


def test_packed_documents_and_batch():
    compare(Choice(**TILED), batch=2, longest_document=512)


def _largest_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def _sp_rank(ring: int) -> None:
    import longseq

    mesh = longseq.init_mesh(sp=2, ring=ring)
    compare(Choice(**TILED), lengths=(6144, 12288), mesh=mesh, sp=2, ring=ring)


@pytest.mark.parametrize("ring", [1, 2], ids=["ulysses", "ring"])
def test_two_ranks(ring):
    run_distributed(_sp_rank, 2, ring)


def test_plan_config_reproduces_the_planned_split():
    """The plan's host budget makes the offloader keep exactly the planned attention outputs (and no checkpoint on
    the GPU), so the run's offloaded bytes and recomputed layers are the plan's."""
    problem = tiny_problem(2048)
    choice = dataclasses.replace(Choice(**TILED), attention_host_layers=2)
    got = measure(problem, choice, "cpu")
    steps = 2  # measure runs a warm-up step and a measured one; the offloader's counts cover both
    assert got["attention_not_kept"] == steps * (TINY.layers - 2) and got["checkpoints_on_device"] == 0
    assert got["offloaded_peak_gib"] * GIB == footprint(problem, choice).host_budget_bytes
