"""What each byte at the peak of a training step is: a CUDA memory history of the second step, replayed to its peak.

    python -m bench.memory_snapshot --lengths 32768 65536 --layers 2            # one GPU
    python -m bench.memory_snapshot --shape llama-8b/8 --layers 3 --lengths 1024 2048 --device cpu --scale 8 \
        --memory tile_tokens=128,attention_heads_per_call=1      # CPU stand-in: live tensors (bench/live_tensors.py)

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
from bench.live_tensors import LiveTensors

# Llama-3.1-8B with an eighth of its width (4 query heads of 128, 1 K/V head), for the CPU stand-in: per-token
# figures are 1/8 of the 8B's (--scale 8 prints them as the 8B's).
SHAPES.setdefault("llama-8b/8", dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, vocab_size=3000,
                                     rope_theta=500000.0, max_position_embeddings=1 << 16))
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


def _host_memory(filename: str, function: str) -> bool:
    """Allocations that are host copies of offloaded tensors (not device memory) on a machine without CUDA."""
    return filename.endswith("host_arena.py") or (filename.endswith("host_copy.py") and function == "__init__")


def measure_cpu(model, length: int, phases: list[str]) -> dict:
    """The step's peak and the tensors alive at it, followed through the dispatcher (bench/live_tensors.py)."""
    step = step_fn(model, "all", length, "cpu")
    step()
    with LiveTensors(excluded=_host_memory) as live:
        step()
    return dict(length=length, base_gib=0.0, peak_gib=live.peak / 2**30, groups=live.at_peak, peak_op=live.peak_op,
                phase_peaks_gib={k: v / 2**30 for k, v in live.node_peaks.items()},
                phase_groups={phase: live.node_at_peak.get(phase, {}) for phase in phases},
                counts={k: len(v) for k, v in live.shapes.items()},
                shapes={k: [str(s).replace(str(length), "S") for s in v] for k, v in live.shapes.items()})


def measure(model, length: int, device: str, phases: list[str]) -> dict:
    if device != "cuda":
        return measure_cpu(model, length, phases)
    step = step_fn(model, "all", length, device)
    step()  # warm-up: cuDNN plans, pinned blocks
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


def _print_phase(a: dict, b: dict, phase: str, scale: float) -> None:
    """What was alive at the peak of one autograd node's run, as KiB per token between lengths a and b."""
    span = (b["length"] - a["length"]) * 1024
    ga, gb = a["phase_groups"].get(phase, {}), b["phase_groups"].get(phase, {})
    print(f"alive at the peak of {phase}:")
    for where in sorted(set(ga) | set(gb), key=lambda w: ga.get(w, 0) - gb.get(w, 0)):
        v = (gb.get(where, 0) - ga.get(where, 0)) / span
        if abs(v) * scale >= 0.25:
            print(f"  {v:7.3f} KiB/tok  {v * scale:7.2f} × {scale:g}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--memory", default="", help="MemoryConfig fields, e.g. cache_attention=False,tiled_mlp=False")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stacks", default="python", help="python, cpp or all (torch.cuda.memory._record_memory_history)")
    parser.add_argument("--context", default="all")
    parser.add_argument("--phase", nargs="*", default=[], help="on CPU: also list what was alive at the peak of these "
                        "autograd nodes (e.g. RingAttentionFunctionBackward)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="also print per-token figures times this (8 for llama-8b/8: the 8B shape's)")
    args = parser.parse_args()
    global CONTEXT, STACKS
    CONTEXT, STACKS = args.context, args.stacks
    model = build_model(args.shape, args.layers, args.device)
    fields = dict(kv.split("=") for kv in args.memory.split(",") if kv)
    fields = {k: {"True": True, "False": False}.get(v, v) for k, v in fields.items()}
    longseq.apply(model, memory=longseq.MemoryConfig(**{k: int(v) if str(v).isdigit() else v
                                                        for k, v in fields.items()}))
    rows = [measure(model, length, args.device, args.phase) for length in args.lengths]
    for row in rows:
        print(f"length {row['length']}: peak {row.get('peak_gib', 0):.2f} GiB (base {row.get('base_gib', 0):.2f})"
              + (f", reached at {row['peak_op']}" if row.get("peak_op") else ""))
        for where, nbytes in sorted(row["groups"].items(), key=lambda kv: -kv[1])[:25]:
            shapes = " ".join(row["shapes"][where]) if "shapes" in row else ""
            print(f"  {nbytes / 2**20:10.1f} MiB  {nbytes / row['length'] / 1024:7.2f} KiB/tok  "
                  f"x{row['counts'][where]:<4} {where} {shapes}")
    record = dict(bench="memory_snapshot", shape=args.shape, layers=args.layers, memory=fields, device=args.device,
                  scale=args.scale, rows=rows, **machine())
    if len(rows) >= 2 and rows[0]["groups"]:
        a, b = rows[0], rows[-1]
        span = b["length"] - a["length"]
        slope = {k: (b["groups"].get(k, 0) - a["groups"].get(k, 0)) / span / 1024 for k in set(a["groups"]) | set(b["groups"])}
        record["kib_per_token"] = {k: round(v, 3) for k, v in slope.items() if abs(v) * args.scale >= 0.25}
        record["peak_kib_per_token"] = (b["peak_gib"] - a["peak_gib"]) * 2**20 / span
        scaled = f" (× {args.scale:g}: {record['peak_kib_per_token'] * args.scale:.1f})" if args.scale != 1 else ""
        print(f"peak slope {record['peak_kib_per_token']:.2f} KiB/token{scaled}; by place:")
        for where, v in sorted(record["kib_per_token"].items(), key=lambda kv: -kv[1]):
            print(f"  {v:7.3f} KiB/tok  {v * args.scale:7.2f} × {args.scale:g}  {where}")
        if "phase_peaks_gib" in a:
            phases = set(a["phase_peaks_gib"]) & set(b["phase_peaks_gib"])
            record["phase_kib_per_token"] = {
                k: round((b["phase_peaks_gib"][k] - a["phase_peaks_gib"][k]) * 2**20 / span, 3) for k in phases}
            print("peak slope while each autograd node ran (the phases of the step):")
            for phase, v in sorted(record["phase_kib_per_token"].items(), key=lambda kv: -kv[1])[:8]:
                print(f"  {v:7.3f} KiB/tok  {v * args.scale:7.2f} × {args.scale:g}  {phase}")
            for phase in args.phase:
                _print_phase(a, b, phase, args.scale)
    write_record("memory_snapshot", record)


if __name__ == "__main__":
    main()
