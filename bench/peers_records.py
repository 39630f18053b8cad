"""The records of bench.run_peers, and the one interface every contender returns.

Shared by the worker (run_peers), the driver (peers_driver), the report (report_peers), the registry (peers_registry)
and the contender modules (peers_contenders, peers_alst, peers_accelerate), so that none of them needs to import one
that imports it back: the record's fields are made, written, read, keyed and tabulated here, and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.common import SHAPES, machine

ROOT = Path(__file__).resolve().parent.parent
VERSION_KEYS = ("card", "gpus", "torch", "transformers", "cuda", "deepspeed", "liger_kernel", "accelerate")
PLACEMENTS = ("gpu", "optimizer", "all")
"""Where a contender keeps its training state, least offloaded first: gpu (everything on the GPU), optimizer (the
optimizer state and fp32 master weights on the host), all (the parameters too)."""


class ContenderUnavailable(RuntimeError):
    """The contender cannot run on this machine or layout (a package or CUDA missing, --sp it does not take): its run
    records status "unavailable" with this one-line reason, and the driver moves on."""


def missing(*modules: str) -> list[str]:
    """The reason, as a one-item list, when a peer's package among `modules` is not installed here (else [])."""
    absent = [m.replace("_", "-") for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return []
    return [f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed (pip install "
            f"{' '.join(absent)}; GPU machines: carry .whl, filled by bash bench/fetch_peer_wheels.sh)"]


def why_unavailable(name: str, reasons: list[str]) -> str:
    """One line naming every reason the contender `name` cannot run here."""
    return f"{name} cannot run here: " + "; ".join(reasons) + "."


def require(name: str, reasons: list[str]) -> None:
    """Raise ContenderUnavailable naming every reason the contender `name` cannot run here (no reasons: return)."""
    if reasons:
        raise ContenderUnavailable(why_unavailable(name, reasons))


@dataclass
class Contender:
    step: Callable[[torch.Tensor], float]
    """One step on the full (1, length) token ids (each contender shards them itself); returns the loss."""
    config: object
    """The model's transformers config (for FLOPs and the record)."""
    settings: dict = field(default_factory=dict)
    """What this contender switched on, for the record."""
    observed: Callable[[], dict] = dict
    """What the run did that settings cannot say in advance (rank 0's), for the record."""


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of one run, which its record states: the worker's and the driver's (which hands them on)."""
    parser.add_argument("--sp", type=int, default=1, help="sequence-parallel degree = processes of one run")
    parser.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (stated in the record)")
    parser.add_argument("--timed", type=int, default=2, help="timed steps after the first (median and min are "
                        "recorded); 0: memory only")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "none"],
                        help="adamw: each step ends with the contender's AdamW update; none: forward + backward only")
    parser.add_argument("--memory", default="default", choices=["default", "auto"],
                        help="longseq: MemoryConfig() (with --memory-field), or the planner's choice per length "
                             "(longseq.AutoMemory, --memory-field forcing fields; records memory_in_use)")
    parser.add_argument("--memory-field", action="append", default=[], metavar="NAME=VALUE",
                        help="longseq: a MemoryConfig field, e.g. cache_attention=false (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, one more under torch.profiler; its top kernels go in the record")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])


def run_argv(args, placement: str) -> list[str]:
    """The worker's command-line options for `args` (parsed with add_run_options) at one placement; the driver adds
    --timed (0 for --search probes)."""
    argv = ["--sp", str(args.sp), "--shape", args.shape, "--optimizer", args.optimizer, "--memory", args.memory,
            "--seed", str(args.seed), "--device", args.device, "--placement", placement]
    argv += ["--layers", str(args.layers)] if args.layers else []
    argv += ["--profile"] if args.profile and args.timed else []
    for pair in args.memory_field:
        argv += ["--memory-field", pair]
    return argv


def versions() -> dict:
    """The machine (card, versions, date) and the versions of the peers' packages this process imported."""
    found = machine()
    for name in ("deepspeed", "liger_kernel", "arctic_training", "accelerate"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


def base_record(args, length: int, world: int) -> dict:
    """What the worker knows about a run before it starts."""
    return dict(bench="peers", contender=args.contender, shape=args.shape, layers=args.layers or "full",
                length=length, sp=args.sp, world=world, timed_steps=args.timed, seed=args.seed, device=args.device,
                optimizer=args.optimizer, placement=args.placement, omp_threads=os.environ.get("OMP_NUM_THREADS"),
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))


def emit(record: dict, records: str | None) -> None:
    """Append one record to `records` (the driver's file), or to bench/results/peers.jsonl; print it."""
    line = json.dumps(record, sort_keys=True, default=str)
    if records:
        with open(records, "a") as fh:
            fh.write(line + "\n")
    else:
        from bench.common import write_record

        write_record("peers", record)
    print(line, flush=True)


def save(records: list[dict], path: str | Path) -> None:
    """Append the driver's records to `path` (and to $OUT/peers.jsonl when $OUT is set)."""
    lines = [json.dumps(r, sort_keys=True, default=str) for r in records]
    targets = [Path(path)] + ([Path(os.environ["OUT"]) / "peers.jsonl"] if os.environ.get("OUT") else [])
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as fh:
            fh.writelines(line + "\n" for line in lines)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(r: dict) -> tuple:
    """(shape, sp, layers): the runs whose figures belong in one comparison."""
    return r.get("shape", "llama-8b"), r.get("sp"), str(r.get("layers", "full"))


def latest(records: list[dict]) -> dict:
    """(contender, shape, sp, layers, length) -> the latest ok-or-failed measured record (searches and skips left
    out)."""
    found = {}
    for r in records:
        if r.get("status") in ("search", "skipped") or r.get("length") is None:
            continue
        found[(r["contender"], *series(r), r["length"])] = r
    return found


def kib_per_token(record: dict) -> float | None:
    """Peak GPU memory (weights and all) per token a GPU holds (length / sp), KiB."""
    peak, length = record.get("peak_gib"), record.get("length")
    if peak is None or not length or peak != peak:
        return None
    return peak * 2**20 / (length / (record.get("sp") or 1))


def optimizer_of(record: dict) -> str:
    """adamw or none; records from before the field existed say it in their settings (hf, longseq-nooptim: none)."""
    if record.get("optimizer"):
        return record["optimizer"]
    settings = record.get("settings") or {}
    legacy_none = record.get("contender") in ("hf", "longseq-nooptim")
    return "none" if settings.get("optimizer") == "none" or (not settings and legacy_none) else "adamw"


def placement_of(record: dict) -> str | None:
    """gpu, optimizer or all (PLACEMENTS); for older records read from their settings (None when they do not say)."""
    if record.get("placement"):
        return record["placement"]
    settings = record.get("settings") or {}
    zero = settings.get("zero") or {}
    if zero:
        return "all" if "offload_param" in zero else "optimizer" if "offload_optimizer" in zero else "gpu"
    if "cpu_offload" in settings:
        return "gpu" if settings["cpu_offload"] == "none" else "all"
    return "gpu" if settings else None


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value == value else "–"


def table(records: list[dict]) -> str:
    """A markdown table, one row per record (a search's summary as one row). `step` is what a step ran (fwd+bwd, with
    the optimizer or not), `state` the placement of the training state, `% ideal` the ideal step over the step."""
    head = ("| contender | sp | layers | length | status | step | state | loss | GPU peak GiB | GPU KiB/token "
            "| host peak GiB | step s (min) | tok/s/GPU | TFLOP/s/GPU | ideal s | % ideal | code | call |")
    rows = [head, "|" + " --- |" * 18]
    for r in records:
        if r.get("status") == "search":
            rows.append(f"| {r['contender']} | {r['sp']} | {r['layers']} | longest ok: {r['longest_ok']} "
                        f"(failed: {r['shortest_failed']}) | search |" + " |" * 11
                        + f" {r.get('code') or ''} | {r.get('device_call') or ''} |")
            continue
        step = "fwd+bwd" if optimizer_of(r) == "none" else "+adamw"
        rows.append(f"| {r.get('contender')} | {r.get('sp')} | {r.get('layers', '')} | {r.get('length')} | "
                    f"{r.get('status')} | {step} | {placement_of(r) or '–'} | {fmt(r.get('first_step_loss'), '.4f')} | "
                    f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(kib_per_token(r), '.0f')} | "
                    f"{fmt(r.get('host_peak_gib'), '.1f')} | {fmt(r.get('step_s'), '.2f')} "
                    f"({fmt(r.get('step_s_min'), '.2f')}) | {fmt(r.get('tokens_per_s_per_gpu'), '.0f')} | "
                    f"{fmt(r.get('tflops_per_gpu'), '.0f')} | {fmt(r.get('ideal_step_s'), '.2f')} | "
                    f"{fmt(r.get('pct_of_ideal'), '.0f')} | {r.get('code') or ''} | {r.get('device_call') or ''} |")
    return "\n".join(rows)
