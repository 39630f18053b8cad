"""The records of bench.run_peers, and the one interface every contender returns.

Shared by the worker (run_peers), the driver (peers_driver), the report (report_peers) and the contender modules
(peers_contenders, peers_alst), so that none of them needs to import another: the record's fields are made, written,
read, keyed and tabulated here, and nowhere else.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.common import machine

ROOT = Path(__file__).resolve().parent.parent
VERSION_KEYS = ("card", "gpus", "torch", "transformers", "cuda", "deepspeed", "liger_kernel")


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


def versions() -> dict:
    """The machine (card, versions, date) and the versions of the peers' packages this process imported."""
    found = machine()
    for name in ("deepspeed", "liger_kernel", "arctic_training"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


def base_record(args, length: int, world: int) -> dict:
    """What the worker knows about a run before it starts."""
    return dict(bench="peers", contender=args.contender, shape=args.shape, layers=args.layers or "full",
                length=length, sp=args.sp, world=world, timed_steps=args.timed, seed=args.seed, device=args.device,
                omp_threads=os.environ.get("OMP_NUM_THREADS"), alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))


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


def save(records: list[dict]) -> None:
    """Append the driver's records to bench/results/peers.jsonl (and $OUT/peers.jsonl when $OUT is set)."""
    lines = [json.dumps(r, sort_keys=True, default=str) for r in records]
    for folder in filter(None, [os.environ.get("OUT"), str(ROOT / "bench" / "results")]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / "peers.jsonl", "a") as fh:
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


def table(records: list[dict]) -> str:
    """A markdown table, one row per record (a search's summary as one row)."""
    head = ("| contender | sp | layers | length | status | loss | GPU peak GiB | GPU KiB/token | host peak GiB | step s "
            "| tok/s/GPU | TFLOP/s/GPU | call |")
    rows = [head, "|" + " --- |" * 13]

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) and value == value else "–"

    for r in records:
        if r.get("status") == "search":
            rows.append(f"| {r['contender']} | {r['sp']} | {r['layers']} | longest ok: {r['longest_ok']} "
                        f"(failed: {r['shortest_failed']}) | search | | | | | | | | {r.get('device_call', '')} |")
            continue
        rows.append(f"| {r.get('contender')} | {r.get('sp')} | {r.get('layers', '')} | {r.get('length')} | "
                    f"{r.get('status')} | {fmt(r.get('first_step_loss'), '.4f')} | {fmt(r.get('peak_gib'), '.1f')} | "
                    f"{fmt(kib_per_token(r), '.0f')} | "
                    f"{fmt(r.get('host_peak_gib'), '.1f')} | {fmt(r.get('step_s'), '.2f')} | "
                    f"{fmt(r.get('tokens_per_s_per_gpu'), '.0f')} | {fmt(r.get('tflops_per_gpu'), '.0f')} | "
                    f"{r.get('device_call', '')} |")
    return "\n".join(rows)
