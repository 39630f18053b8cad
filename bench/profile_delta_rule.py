"""The gated delta rule alone (parallel/delta_rule.py), forward + backward at growing lengths: what it keeps for the
backward and what its backward allocates, per token and value head, and how both grow with the length. On a CPU the
live bytes at the peak come from bench/live_tensors.py; on a GPU from the allocator's peak.

    python -m bench.profile_delta_rule --k-heads 16 --v-heads 32 --lengths 16384 32768 65536 131072 --dtype bf16
    python -m bench.profile_delta_rule --k-heads 1 --v-heads 2 --lengths 2048 4096 8192 16384   (CPU, fp32)
    python -m bench.profile_delta_rule --tiny                                                       (CPU: runs end to end, no record)

Prints a table and ends with one JSON line (also appended to bench/results/profile_delta_rule.jsonl unless --tiny).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import machine, peak_gib, reset_peak, synchronize, write_record
from bench.live_tensors import BackwardAllocations, LiveTensors
from bench.peers_driver import code_version
from longseq.parallel.delta_rule import Segment, chunk_layout, gated_delta_rule


def inputs(length: int, args, device, dtype):
    generator = torch.Generator(device).manual_seed(0)
    q, k = (torch.randn(1, length, args.k_heads, args.dim, generator=generator, device=device, dtype=dtype)
            for _ in range(2))
    v = torch.randn(1, length, args.v_heads, args.dim, generator=generator, device=device, dtype=dtype)
    g = -0.2 * torch.rand(1, length, args.v_heads, generator=generator, device=device)
    beta = torch.rand(1, length, args.v_heads, generator=generator, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


def measure(length: int, args, device, dtype) -> dict:
    """One length: timed forward and backward, then counted ones (saved bytes, backward allocations, the peak)."""
    layout = chunk_layout([[Segment(start=0, length=length)]], length, device=device)
    tensors = inputs(length, args, device, dtype)
    gated_delta_rule(*tensors, layout).float().square().mean().backward()  # warm-up
    reset_peak()
    synchronize()
    start = time.perf_counter()
    out = gated_delta_rule(*tensors, layout).float().square().mean()
    synchronize()
    middle = time.perf_counter()
    out.backward()
    synchronize()
    row = dict(tokens=length, forward_s=middle - start, backward_s=time.perf_counter() - middle)
    if device.type == "cuda":
        row["peak_gib"] = peak_gib()
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = gated_delta_rule(*tensors, layout).float().square().mean()
    with BackwardAllocations() as allocated:
        out.backward()
    if device.type == "cpu":
        with LiveTensors() as live:
            gated_delta_rule(*tensors, layout).float().square().mean().backward()
        row["peak_gib"] = live.peak / 2**30
    per = 1024 * length * args.v_heads
    row.update(saved_kib=sum(saved.values()) / per, backward_alloc_kib=allocated.bytes / per,
               peak_kib=row["peak_gib"] * 2**30 / per)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k-heads", type=int, default=16)
    parser.add_argument("--v-heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128, help="dk = dv")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--code", default=None, help="the code's commit, stored (default: git's HEAD of this tree)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a check that it runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.k_heads, args.v_heads, args.dim, args.lengths, args.dtype = 1, 2, 16, [256, 512], "fp32"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = [measure(length, args, device, dtype) for length in args.lengths]
    print("per token and value head:")
    print(f"{'tokens':>8} {'fwd s':>8} {'bwd s':>8} {'saved KiB':>10} {'bwd alloc KiB':>14} {'peak KiB':>9}")
    for row in rows:
        print(f"{row['tokens']:>8} {row['forward_s']:>8.3f} {row['backward_s']:>8.3f} {row['saved_kib']:>10.2f} "
              f"{row['backward_alloc_kib']:>14.2f} {row['peak_kib']:>9.2f}")
    record = dict(bench="profile_delta_rule", k_heads=args.k_heads, v_heads=args.v_heads, dim=args.dim,
                  dtype=args.dtype, code=args.code or code_version(), rows=rows, **machine())
    if args.tiny:
        print(json.dumps(record, sort_keys=True))
    else:
        write_record("profile_delta_rule", record)
    return record


if __name__ == "__main__":
    main()
