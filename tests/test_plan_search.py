"""The plan's search: fastest fitting configuration, longest length, what is short, and plan_for → longseq.apply.

    PYTHONPATH=src python -m pytest -q tests/test_plan_search.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import longseq
from longseq.plan import search
from longseq.plan.choice import Choice
from longseq.plan.errors import PlanError
from longseq.plan.planner import machine_for, plan, plan_for, plan_longest
from longseq.plan.problem import Layout, Problem, Workload
from longseq.plan.search import LENGTH_STEP, evaluate, fits_somehow, longest_length
from longseq.plan.shapes import SHAPES
from tests.models import tiny_model

GIB = 2**30


def problem(length=131072, *, layers=4, training="forward-backward", gpu=79.0, host=125.0, sp=1,
            **workload) -> Problem:
    return Problem(shape=SHAPES["llama-8b"].with_layers(layers), layout=Layout(sp=sp),
                   workload=Workload(length=length, training=training, **workload),
                   machine=machine_for("h200", gpu_memory_gib=gpu, host_memory_gib=host, gpus_per_host=sp))


@pytest.mark.parametrize("training", ["forward-backward", "lora", "full"])
def test_more_memory_never_shortens_the_longest_length(training):
    by_gpu = [longest_length(problem(training=training, gpu=gpu)) for gpu in (24, 40, 60, 80, 140)]
    by_host = [longest_length(problem(training=training, host=host)) for host in (12, 24, 48, 96, 200)]
    assert by_gpu == sorted(by_gpu) and by_host == sorted(by_host)
    assert by_gpu[-1] > by_gpu[0] > 0 and by_host[-1] > by_host[0] > 0


def test_longest_length_is_the_edge_of_what_fits():
    p = problem(gpu=40)
    longest = longest_length(p)
    assert longest % LENGTH_STEP == 0
    assert fits_somehow(p.with_length(longest)) and not fits_somehow(p.with_length(longest + LENGTH_STEP))
    result = plan_longest(p)
    assert result.fits and result.longest == longest and result.problem.workload.length == longest
    assert result.limit in ("GPU memory", "host memory", "GPU and host memory together")


def test_limit_names_the_budget_that_stops_a_longer_length():
    assert plan_longest(problem(gpu=40, host=500)).limit == "GPU memory"
    # With a small host, more checkpoints on the GPU would free host memory but take GPU memory the run lacks.
    assert plan_longest(problem(gpu=140, host=12)).limit == "GPU and host memory together"


def test_step_time_budget():
    unbounded = plan_longest(problem(gpu=140))
    budget = unbounded.chosen.time.seconds / 4
    bounded = plan_longest(problem(gpu=140), max_step_s=budget)
    assert bounded.limit == "step time" and bounded.longest < unbounded.longest
    assert bounded.chosen.time.seconds <= budget
    assert not plan(problem(unbounded.longest, gpu=140), max_step_s=budget).fits


def test_the_bounds_cut_nothing_faster():
    """The search stops at the first base whose time bound is no faster than the best found or over the step-time
    budget (Note [Plan search]); every placement of every base, evaluated, finds nothing faster within each budget."""
    p = problem(gpu=40)
    evaluations = search.Evaluations(p)
    every = [e for base in search._bases(p, least_memory=False) for e in search._placements(evaluations, base)
             if e.fits]
    fastest_time = min(e.time.seconds for e in every)
    for budget in (None, fastest_time * 0.99, fastest_time, fastest_time * 1.2, fastest_time * 3):
        within = [e.time.seconds for e in every if budget is None or e.time.seconds <= budget]
        found = search.fastest(p, budget)
        assert (found.time.seconds if found else None) == (min(within) if within else None), budget


def test_impossible_budgets_say_what_is_short_and_by_how_much():
    weights_alone = plan(problem(length=8192, layers=32, gpu=20))  # 8B bf16 weights + gradients: 30 GiB
    assert not weights_alone.fits and weights_alone.limit == "GPU memory"
    assert weights_alone.shortfall()["gpu_gib"] > 10 and weights_alone.shortfall()["host_gib"] == 0
    assert "GPU memory is short by at least" in weights_alone.shortfall_message()
    no_host = plan(problem(length=8192, host=2))  # less than the process itself needs
    assert not no_host.fits and no_host.limit == "host memory"
    assert "host memory is short by at least" in no_host.shortfall_message()
    with pytest.raises(PlanError, match="GPU memory is short"):
        weights_alone.memory_config()


def test_short_sequences_run_without_memory_features():
    """Where memory is ample the fastest configuration is the plain model (features only cost time)."""
    choice = plan(problem(length=4096)).chosen.choice
    assert not choice.checkpointing and not choice.tiled_mlp and not choice.tiled_loss


def test_long_sequences_keep_attention_outputs_where_memory_allows():
    ample = plan(problem(length=131072, host=125)).chosen.choice
    assert ample.checkpointing and ample.cache_attention
    assert ample.attention_host_layers + ample.checkpoint_gpu_layers == 4  # every layer keeps its output
    tight = plan(problem(length=131072, gpu=24, host=12))
    assert tight.fits
    kept = tight.chosen.choice
    # The host cannot hold four checkpoints and four outputs: fewer outputs, or fewer checkpoints, or the GPU's help.
    assert kept.attention_host_layers < 4 or kept.layers_per_checkpoint > 1 or kept.checkpoint_gpu_layers > 0


def test_chosen_is_the_fastest_fitting_candidate():
    p = problem(length=65536, gpu=40)
    chosen = plan(p).chosen
    for other in (Choice(attention_host_layers=4), Choice(cache_attention=False), Choice(checkpoint_gpu_layers=4)):
        evaluation = evaluate(p, other)
        assert not evaluation.fits or evaluation.time.seconds >= chosen.time.seconds


def test_checkpoint_segments_lengthen_what_the_host_allows():
    """layers_per_checkpoint divides the checkpoints' host bytes: with a small host it is what lets longer fit."""
    p = problem(length=131072, layers=8, gpu=140, host=24)
    result = plan_longest(p)
    assert result.chosen.choice.layers_per_checkpoint > 1
    flat = [evaluate(result.problem, dataclasses.replace(result.chosen.choice, layers_per_checkpoint=1,
                                                         checkpoint_gpu_layers=n)) for n in range(9)]
    assert not any(e.fits for e in flat)


def test_plan_for_gives_a_config_longseq_apply_takes():
    reference = tiny_model(num_hidden_layers=3)
    machine = machine_for("cpu", gpu_memory_gib=0.03, host_memory_gib=0.05)
    memory = plan_for(reference.config, longseq.Mesh(), (1, 2048), machine, training="forward-backward")
    assert isinstance(memory, longseq.MemoryConfig)
    model = longseq.apply(tiny_model(num_hidden_layers=3), longseq.Mesh(), memory)
    ids = torch.randint(0, 256, (1, 2048), generator=torch.Generator().manual_seed(0))
    batch = longseq.shard_batch({"input_ids": ids, "position_ids": torch.arange(2048)[None]}, longseq.Mesh())
    loss = longseq.causal_lm_loss(model, batch)
    loss.backward()
    want = reference(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, want)
    with pytest.raises(PlanError, match="short"):
        plan_for(reference.config, longseq.Mesh(), (1, 1 << 22), machine, training="forward-backward")


@pytest.mark.parametrize("training", ["forward-backward", "lora", "full"])
def test_a_plan_keeps_the_gpu_margin(training):
    """Note [Plan search]'s margin: the chosen configuration's GPU peak never passes gpu_memory × (1 − gpu_headroom),
    at device call 26's machine (139.8 GiB H200, 125 GiB host) over lengths where different features win, and with
    the margin raised the plan obeys the new limit (choosing another configuration where it must)."""
    for length in (16384, 32768, 65536, 131072, 262144):
        for headroom in (0.05, 0.15):
            p = problem(length, layers=8, training=training, gpu=139.8, fsdp_cpu_offload=False if training ==
                        "full" else None)
            p = dataclasses.replace(p, machine=dataclasses.replace(p.machine, gpu_headroom=headroom))
            result = plan(p)
            if result.fits:
                assert result.chosen.footprint.gpu.bytes <= 139.8 * (1 - headroom) * GIB
    assert problem().machine.gpu_headroom == 0.05


def test_device_call_26_at_128k_keeps_its_outputs_without_a_leak():
    """Device call 26's 128K problem (8 layers, 'full' without FSDP2 CPU offload, bf16): the plan still keeps every
    attention output on the GPU with checkpoints on the host, and now predicts 75.9 GiB at layer 7's MLP backward
    (no layer above holds its recompute any more, Note [Kept pairs hold no graph]; no fp32 gradient exists yet)."""
    p = problem(131072, layers=8, training="full", gpu=139.8, fsdp_cpu_offload=False)
    chosen = plan(p).chosen
    assert chosen.choice.checkpointing and chosen.choice.gpu_attention_layers == 8
    assert chosen.footprint.gpu.moment == "MLP backward of layer 7"
    assert chosen.footprint.gpu.bytes / GIB == pytest.approx(75.9, abs=0.05)
    assert "held after backward" not in chosen.footprint.gpu.by_group()
