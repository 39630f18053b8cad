"""What each byte at the peak of a training step is: a CUDA memory history of the second step, replayed to its peak.

    python -m bench.memory_snapshot --lengths 32768 65536 --layers 2            # one GPU
    python -m bench.memory_snapshot --lengths 256 512 --layers 2 --shape tiny --device cpu   # CPU smoke run (no history)

For each length: the step's peak, and the blocks alive at that peak grouped by where they were allocated (the
innermost longseq or transformers frame, else the innermost Python frame; blocks allocated by autograd's C++
backward formulas carry no Python frame and are grouped by size). Between two lengths, each group's KiB per extra
token is its slope: the per-token working set, what issue 13 asks to shrink. Prints a table per length and one
JSON line (appended to bench/results/memory_snapshot.jsonl).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import longseq
from bench.bench_memory import step_fn
from bench.common import SHAPES, build_model, machine, write_record

SHAPES.setdefault("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=256, max_position_embeddings=1 << 16))


def _where(frames: list[dict]) -> str:
    for frame in frames:
        name = frame.get("filename", "")
        if "/longseq/" in name or "/transformers/" in name:
            short = name.split("/longseq/")[-1] if "/longseq/" in name else "hf/" + name.split("/transformers/")[-1]
            return f"{short}:{frame.get('line')}:{frame.get('name')}"
    for frame in frames:
        if frame.get("filename", "").endswith(".py"):
            return f"{frame['filename'].rsplit('/', 1)[-1]}:{frame.get('line')}:{frame.get('name')}"
    for frame in frames:
        if "::" in frame.get("name", "") and "c10::" not in frame["name"]:
            return "c++ " + frame["name"][:90]
    return "c++ (no python frame)"


def alive_at_peak(trace: list[dict]) -> tuple[int, dict[str, list[int]]]:
    """Replay alloc/free events; the blocks alive when the allocated total was highest, grouped by _where."""
    alive, total, peak, peak_at = {}, 0, -1, 0
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            alive[event["addr"]] = event["size"]
            total += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in alive:
            total -= alive.pop(event["addr"])
        if total > peak:
            peak, peak_at = total, i
    groups: dict[str, list[int]] = defaultdict(list)
    alive = {}
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_requested":
            alive.pop(event["addr"], None)
    for event in alive.values():
        groups[_where(event.get("frames", []))].append(event["size"])
    return peak, groups


CONTEXT, STACKS = "all", "python"


def measure(model, length: int, device: str) -> dict:
    step = step_fn(model, "all", length, device)
    step()  # warm-up: cuDNN plans, pinned blocks
    if device != "cuda":
        step()
        return dict(length=length, groups={})
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(context=CONTEXT, stacks=STACKS, max_entries=2_000_000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, groups = alive_at_peak(snapshot["device_traces"][0])
    return dict(length=length, base_gib=base / 2**30, peak_gib=(base + peak) / 2**30,
                groups={k: sum(v) for k, v in groups.items()}, counts={k: len(v) for k, v in groups.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--memory", default="", help="MemoryConfig fields, e.g. cache_attention=False,tiled_mlp=False")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stacks", default="python", help="python, cpp or all (torch.cuda.memory._record_memory_history)")
    parser.add_argument("--context", default="all")
    args = parser.parse_args()
    global CONTEXT, STACKS
    CONTEXT, STACKS = args.context, args.stacks
    model = build_model(args.shape, args.layers, args.device)
    fields = dict(kv.split("=") for kv in args.memory.split(",") if kv)
    fields = {k: {"True": True, "False": False}.get(v, v) for k, v in fields.items()}
    longseq.apply(model, memory=longseq.MemoryConfig(**{k: int(v) if str(v).isdigit() else v
                                                        for k, v in fields.items()}))
    rows = [measure(model, length, args.device) for length in args.lengths]
    for row in rows:
        print(f"length {row['length']}: peak {row.get('peak_gib', 0):.2f} GiB (base {row.get('base_gib', 0):.2f})")
        for where, nbytes in sorted(row["groups"].items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {nbytes / 2**20:10.1f} MiB  {nbytes / row['length'] / 1024:7.2f} KiB/tok  "
                  f"x{row['counts'][where]:<4} {where}")
    record = dict(bench="memory_snapshot", shape=args.shape, layers=args.layers, memory=fields, rows=rows, **machine())
    if len(rows) >= 2 and rows[0]["groups"]:
        a, b = rows[0], rows[-1]
        span = b["length"] - a["length"]
        slope = {k: (b["groups"].get(k, 0) - a["groups"].get(k, 0)) / span / 1024 for k in set(a["groups"]) | set(b["groups"])}
        record["kib_per_token"] = {k: round(v, 2) for k, v in slope.items() if abs(v) >= 0.5}
        record["peak_kib_per_token"] = (b["peak_gib"] - a["peak_gib"]) * 2**20 / span
        print(f"peak slope {record['peak_kib_per_token']:.1f} KiB/token; by place:")
        for where, v in sorted(record["kib_per_token"].items(), key=lambda kv: -kv[1]):
            print(f"  {v:7.2f} KiB/tok  {where}")
    write_record("memory_snapshot", record)


if __name__ == "__main__":
    main()
