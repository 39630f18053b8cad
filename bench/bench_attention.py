"""Attention alone, forward + backward, per GPU: Ulysses, ring and hybrid against the single-GPU kernel at the same
per-GPU work (a causal sequence of S/√P tokens has the work that S tokens split over P GPUs have).

    torchrun --nproc-per-node 4 -m bench.bench_attention --lengths 131072 262144 524288 1048576

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128), bf16, one layer. Prints a table and ends with
one JSON line (also appended to bench/results/bench_attention.jsonl).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist

import longseq
from bench.common import machine, timed, write_record
from longseq.parallel.local import causal_attention
from longseq.parallel.ring import ring_attention
from longseq.parallel.ulysses import heads_to_sequence_split, kv_replication, sequence_to_heads_split

HEADS, KV_HEADS, DIM = 32, 8, 128


def causal_flops(tokens: int) -> float:
    """Forward + backward FLOPs of causal attention (backward = 2.5× forward, as in flash-attention's count)."""
    return 3.5 * 4 * tokens**2 * HEADS * DIM / 2


def sp_step(mesh, local_tokens: int, kernel: str = "sdpa"):
    q = torch.randn(1, HEADS, local_tokens, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, KV_HEADS, local_tokens, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    replicate = kv_replication(HEADS, KV_HEADS, mesh.ulysses)

    def step():
        sq, sk, sv = heads_to_sequence_split(mesh.ulysses_group, q, k, v, replicate)
        if mesh.ring > 1:
            out = ring_attention(mesh.ring_group, sq, sk, sv, scale=DIM**-0.5, kernel=kernel)
        else:
            out = causal_attention(sq, sk, sv, scale=DIM**-0.5)
        out = sequence_to_heads_split(mesh.ulysses_group, out.transpose(1, 2))
        out.backward(torch.ones_like(out))

    return step


def single_step(tokens: int):
    return sp_step(longseq.Mesh(device=torch.device("cuda")), tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flex", action="store_true", help="also ring/hybrid on FlexAttention block kernels")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = dist.get_world_size()
    layouts = {"ulysses": 1, "ring": world, **({"hybrid": 2} if world >= 4 else {})}
    meshes = {name: (longseq.init_mesh(sp=world, ring=ring), "sdpa") for name, ring in layouts.items()}
    if args.flex:
        meshes.update({f"{name}_flex": (mesh, "flex") for name, (mesh, _) in meshes.items() if mesh.ring > 1})
    rows = []
    for length in args.lengths:
        row = dict(length=length)
        same_work = int(length / math.sqrt(world)) // 256 * 256
        step = single_step(same_work)
        step()
        timing = timed(step, args.repeats)
        row["single_gpu_tokens"] = same_work
        row["single_gpu_tflops"] = causal_flops(same_work) / timing.median / 1e12
        for name, (mesh, kernel) in meshes.items():
            step = sp_step(mesh, length // world, kernel)
            step()
            timing = timed(step, args.repeats)
            row.update(timing.fields(name))
            row[f"{name}_tflops_per_gpu"] = causal_flops(length) / world / timing.median / 1e12
            row[f"{name}_vs_single"] = row[f"{name}_tflops_per_gpu"] / row["single_gpu_tflops"]
        torch.cuda.empty_cache()
        rows.append(row)
        if dist.get_rank() == 0:
            print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if dist.get_rank() == 0:
        write_record("bench_attention", dict(bench="bench_attention", world=world, heads=HEADS, kv_heads=KV_HEADS,
                                             head_dim=DIM, rows=rows, **machine()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
