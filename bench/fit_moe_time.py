"""Derive the H200 card's expert and band speeds from device call 28, and print the plan against each of its records.

    python -m bench.fit_moe_time            # CPU, seconds: prints the table and one JSON line
    python -m bench.fit_moe_time --write    # also stores the two fitted figures in plan/cards/h200.json

Device call 28 (one H200, main 9710e3b; bench/results/bench_moe.jsonl) ran bench/bench_moe.py on Qwen3-MoE, Mixtral
and GPT-OSS at 4 layers, 64K and 128K tokens, longseq's default MemoryConfig. Until bench/calibrate.py measures them
on a GPU (expert_speeds, band_speed), two card figures come from those records, each fitted on ONE record:

    expert_row_gelements_s  on Qwen3-MoE 64K (a small expert: its rows weigh most, Note [Expert block time]), the
                            grouped GEMMs at the card's expert_gemm_tflops
    band_tflops             on GPT-OSS 64K, given the rows' rate

The other four records are held out (GPT-OSS 128K only partly: its bands scale with the tokens like its 64K's).
Call 28's code ran GPT-OSS's bands in chunks of 1024 rows (window.py bounds a chunk by the window since 5d97e1b: 128
rows), so a record is compared with the plan of today's code with its bands timed as that code ran them. The
'one speed' column is the single expert speed (rows free) that would explain each record by itself; 'today s' the
plan of today's code (GPT-OSS's bands in 128-row chunks), not yet measured. Two cross-checks follow on the SiLU
families (Qwen3-MoE, Mixtral): one speed for all of an expert block's work, and the rows' rate fitted on Mixtral.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import transformers

from bench import bench_moe
from longseq.parallel.sizes import BAND_SCORES
from longseq.plan.attention import keeps_output, windowed
from longseq.plan.card import CARDS, Card, load_card
from longseq.plan.choice import Choice
from longseq.plan.planner import machine_for
from longseq.plan.problem import Layout, Problem, Workload
from longseq.plan.shapes import shape_from_config
from longseq.plan.timing import band_flops, step_time

RECORDS = Path(__file__).parent / "results" / "bench_moe.jsonl"
CHOICE = Choice(attention_host_layers=4)
"""The benchmark's MemoryConfig() as the plan states it: every attention output kept (on the host)."""
FITS = {"expert_row_gelements_s": ("qwen3_moe", 65536), "band_tflops": ("gpt_oss", 65536)}
SOURCES = {
    "expert_row_gelements_s": "fitted: bench_moe.jsonl device call 28, Qwen3-MoE 64K, the grouped GEMMs at "
                              "expert_gemm_tflops (bench/fit_moe_time.py; the other records held out: docs/plan.md); "
                              "bench/calibrate.py measures it",
    "band_tflops": "fitted: bench_moe.jsonl device call 28, GPT-OSS 64K (its bands then in 1024-row chunks), given "
                   "expert_row_gelements_s (bench/fit_moe_time.py; GPT-OSS 128K held out); bench/calibrate.py "
                   "measures it"}


def call_28() -> list[dict]:
    """(family, tokens, step_s) of each length of device call 28's bench_moe records."""
    rows = []
    for line in RECORDS.read_text().splitlines():
        record = json.loads(line)
        if record.get("device_call") == 28:
            rows += [dict(family=record["family"], tokens=r["tokens"], step_s=r["step_s"]) for r in record["results"]]
    return rows


def problem_of(family: str, tokens: int, card: Card) -> Problem:
    name, settings = bench_moe.SHAPES[family]
    settings = {k: v for k, v in settings.items() if not (family == "mixtral" and k == "sliding_window")}
    config = getattr(transformers, name)(**{"max_position_embeddings": 1 << 22, **settings}, num_hidden_layers=4,
                                         output_router_logits=True)
    return Problem(shape=shape_from_config(config), layout=Layout(),
                   workload=Workload(length=tokens, training="forward-backward"),
                   machine=machine_for(card, gpu_memory_gib=79))


def call_28_band_rows(problem: Problem) -> int:
    """window.py's rows per band chunk at code 9710e3b: BAND_SCORES over the chunk's score columns, unbounded by
    the window."""
    shape, batch, length = problem.shape, problem.workload.batch, problem.workload.document
    return max(1, min(length, BAND_SCORES // (batch * shape.heads * 2 * min(shape.sliding_window, length))))


def as_run(family: str, tokens: int, card: Card) -> float:
    """The plan's step time of call 28's code: today's plan, its bands timed at that code's chunk rows."""
    problem = problem_of(family, tokens, card)
    seconds = step_time(problem, CHOICE).seconds
    for kind in problem.shape.kinds:
        if windowed(problem, kind) == "band":
            assert keeps_output(problem, kind)  # no band forward again in a recompute
            then, now = band_flops(problem, call_28_band_rows(problem)), band_flops(problem)
            seconds += (sum(then) - sum(now)) / (card.band_tflops * 1e12)
    return seconds


def fitted(card: Card, field: str, family: str, tokens: int, measured: float) -> float:
    """The figure of `field` at which the plan matches `measured` (the step time is linear in its inverse)."""
    one, two = (as_run(family, tokens, dataclasses.replace(card, **{field: v})) for v in (1.0, 2.0))
    per_inverse = 2 * (one - two)  # seconds at a figure of 1
    rest = one - per_inverse
    if measured <= rest:
        raise ValueError(f"{family} at {tokens} tokens: the plan's other terms ({rest:.2f} s) already exceed the "
                         f"measured {measured:.2f} s; {field} cannot be fitted to it.")
    return per_inverse / (measured - rest)


def fit(card: Card, records: list[dict]) -> Card:
    """The card with expert_row_gelements_s and band_tflops fitted (FITS), in that order."""
    by_key = {(r["family"], r["tokens"]): r["step_s"] for r in records}
    for field, key in FITS.items():
        card = dataclasses.replace(card, **{field: fitted(card, field, *key, by_key[key])})
    return card


def one_speed(card: Card, record: dict) -> float:
    """The expert speed that alone (rows free) explains a record, TFLOP/s."""
    free = dataclasses.replace(card, expert_row_gelements_s=float("inf"))
    return fitted(free, "expert_gemm_tflops", record["family"], record["tokens"], record["step_s"])


def cross_checks(card: Card, records: list[dict]) -> dict:
    """The SiLU families' errors under two other fits: one speed for all of a block's work fitted on Qwen3-MoE 64K,
    and the rows' rate fitted on Mixtral 64K instead."""
    silu = [r for r in records if r["family"] != "gpt_oss"]
    first = {(r["family"], r["tokens"]): r for r in silu}
    speed = one_speed(card, first["qwen3_moe", 65536])
    one = dataclasses.replace(card, expert_row_gelements_s=float("inf"), expert_gemm_tflops=speed)
    rate = fitted(card, "expert_row_gelements_s", "mixtral", 65536, first["mixtral", 65536]["step_s"])
    on_mixtral = dataclasses.replace(card, expert_row_gelements_s=rate)
    checks = {}
    for name, other, value in (("one speed on Qwen3-MoE 64K", one, speed), ("rows on Mixtral 64K", on_mixtral, rate)):
        errors = {f"{r['family']} {r['tokens']}": as_run(r["family"], r["tokens"], other) / r["step_s"] - 1
                  for r in silu}
        checks[name] = dict(figure=value, errors=errors)
        print(f"{name}: {value:.1f}; " + ", ".join(f"{k} {v:+.1%}" for k, v in errors.items()))
    return checks


def write(card: Card) -> Path:
    path = CARDS / "h200.json"
    data = json.loads(path.read_text())
    for field in FITS:
        data["values"][field] = {"value": round(getattr(card, field), 1), "source": SOURCES[field]}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the fitted figures in plan/cards/h200.json")
    args = parser.parse_args(argv)
    records = call_28()
    card = fit(load_card("h200"), records)
    rows = []
    print(f"{'model':<10} {'tokens':>7} {'measured s':>10} {'plan s':>7} {'error':>7} {'one speed':>9} "
          f"{'today s':>7}  role")
    for r in records:
        plan = as_run(r["family"], r["tokens"], card)
        today = step_time(problem_of(r["family"], r["tokens"], card), CHOICE).seconds
        role = "fitted" if (r["family"], r["tokens"]) in FITS.values() else "held out"
        rows.append(dict(**r, plan_s=plan, error=plan / r["step_s"] - 1, one_speed_tflops=one_speed(card, r),
                         todays_code_plan_s=today, role=role))
        print(f"{r['family']:<10} {r['tokens']:>7} {r['step_s']:>10.2f} {plan:>7.2f} {rows[-1]['error']:>+7.1%} "
              f"{rows[-1]['one_speed_tflops']:>9.0f} {today:>7.2f}  {role}")
    checks = cross_checks(card, records)
    figures = {field: getattr(card, field) for field in FITS}
    if args.write:
        print(f"wrote {write(card)}")
    result = dict(bench="fit_moe_time", figures=figures, rows=rows, cross_checks=checks)
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
