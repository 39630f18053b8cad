"""Packed long-context fine-tuning data at full speed: model TFLOP/s per GPU of rows packed from documents of
log-uniform lengths, beside one document per row at the same token count (the target: ≥ 90% of it).

    torchrun --nproc-per-node 1 -m bench.bench_packed --shape llama-8b --layers 8 --length 131072
    torchrun --nproc-per-node 2 -m bench.bench_packed --shape llama-8b --layers 8 --length 131072 --layouts ulysses ring
    torchrun --nproc-per-node 1 -m bench.bench_packed --attention --length 131072       # attention kernels alone
    torchrun --nproc-per-node 1 -m bench.bench_packed --layers 8 --length 65536 --compile inductor   # compiled too
    python -m bench.bench_packed --rows 200 --placement 2 4 8    # work per ring rank, zigzag vs documents (CPU)
    python -m bench.bench_packed --shape tiny --length 512 --shortest 8 --rows 2         # CPU, end to end

The mix: document lengths drawn log-uniformly from --shortest to --longest tokens (seeded), concatenated and cut
every --length tokens, as longseq's packer does (a document cut at a row's end continues in the next row as its own
document). The record holds the distribution (lengths, documents per row, shares of tokens and of attention work by
length), each run's step time and model TFLOP/s per GPU (the packed rows' attention counted per document), the
packed/single ratio, and with a ring the attention work per rank under zigzag and under Note [Document placement];
with --compile, the same steps of torch.compile(model) and their speed-up over eager (Note [Attention as one operator]).
--attention times one layer's attention (forward + backward, R = 1) on the first packed row: FlashAttention's
variable-length groups with different DENSE_MIN_BLOCK thresholds (0: one dense cuDNN call per document) against one
document. Prints a table and ends with one JSON line (also appended to bench/results/bench_packed.jsonl).
"""

from __future__ import annotations

import argparse
import math
import os
import random

import torch
import torch.distributed as dist
import transformers

import longseq
from bench.common import (SHAPES, attention_flops, build_config, machine, model_flops, peak_gib, reset_peak, timed,
                          write_record)
from longseq.models import apply as apply_module
from longseq.parallel import ring_plan, varlen
from longseq.parallel.balance import attention_work, document_layout, zigzag_layout
from longseq.parallel.ring import ring_attention

BUCKETS = (2048, 8192, 32768)  # length buckets of the distribution: < 2K, 2K–8K, 8K–32K, ≥ 32K


def document_mix(rows: int, length: int, shortest: int, longest: int, seed: int) -> list[list[int]]:
    """Per row, the lengths of the documents (pieces of documents) it holds, in order."""
    rng = random.Random(seed)
    mix, row, room = [], [], length
    while len(mix) < rows:
        left = round(math.exp(rng.uniform(math.log(shortest), math.log(longest))))
        while left and len(mix) < rows:
            take = min(left, room)
            row.append(take)
            left, room = left - take, room - take
            if not room:
                mix.append(row)
                row, room = [], length
    return mix


def describe(mix: list[list[int]]) -> dict:
    """The distribution the record keeps: lengths, documents per row, token and attention-work shares by length."""
    lengths = sorted(n for row in mix for n in row)
    edges = (0, *BUCKETS, math.inf)
    names = [f"{lo}-{hi}" if hi != math.inf else f">={lo}" for lo, hi in zip(edges, edges[1:])]
    tokens, work = sum(lengths), sum(n * n for n in lengths)
    return dict(
        documents=len(lengths), documents_per_row=len(lengths) / len(mix),
        length_quantiles={q: lengths[min(len(lengths) - 1, int(q * len(lengths)))] for q in (0.1, 0.5, 0.9)},
        longest=lengths[-1], documents_by_row=mix,
        token_share={name: sum(n for n in lengths if lo <= n < hi) / tokens
                     for name, lo, hi in zip(names, edges, edges[1:])},
        attention_share={name: sum(n * n for n in lengths if lo <= n < hi) / work
                         for name, lo, hi in zip(names, edges, edges[1:])},
        attention_vs_one_document=work / (len(mix) * sum(mix[0]) ** 2),
    )


def make_batch(mix: list[list[int]], vocab: int, device, packed: bool) -> dict:
    length = sum(mix[0])
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (len(mix), length), generator=g)
    rows = [[length]] * len(mix) if not packed else mix
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    return {"input_ids": ids.to(device), "labels": ids.to(device), "position_ids": positions.to(device)}


def step_flops(mix: list[list[int]], config, packed: bool) -> float:
    """Model FLOPs of a step over these rows: common.model_flops with the attention of each document."""
    rows, length = len(mix), sum(mix[0])
    dense = rows * (model_flops(length, config) - 3 * attention_flops(length, config))
    documents = [n for row in mix for n in row] if packed else [length] * rows
    return dense + 3 * sum(attention_flops(n, config) for n in documents)


def measure(model, mesh, data: dict, flops: float, repeats: int, compiled=None) -> dict:
    """Warm-up step (it compiles, where `compiled` is the torch.compile'd model), then `repeats` timed steps."""
    local = longseq.shard_batch(data, mesh)

    def step():
        loss = longseq.causal_lm_loss(model if compiled is None else compiled, local, mesh)
        loss.backward()
        model.zero_grad(set_to_none=False)
        return loss.detach()

    reset_peak()
    loss = float(step())
    timing = timed(step, repeats)
    return dict(loss=loss, **timing.fields("step"), peak_gib=peak_gib(),
                tflops_per_gpu=flops / timing.median / mesh.world_size / 1e12)


def build(shape: str, layers: int | None, device):
    """common.build_model's model, in fp32 on CPU (bf16 on CUDA)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(build_config(shape, layers), dtype=dtype,
                                                              attn_implementation="sdpa")
    return model.train()


def run_layout(args, mesh, mix) -> dict:
    model = build(args.shape, args.layers, mesh.device)
    longseq.apply(model, mesh, longseq.MemoryConfig() if args.memory == "all" else None)
    vocab, result = model.config.vocab_size, {}
    compiled = torch.compile(model, backend=args.compile) if args.compile else None
    for kind in ("single", "packed"):
        data = make_batch(mix, vocab, mesh.device, packed=kind == "packed")
        flops = step_flops(mix, model.config, kind == "packed")
        result[kind] = measure(model, mesh, data, flops, args.repeats)
        if compiled is not None:
            result[f"{kind}_compiled"] = measure(model, mesh, data, flops, args.repeats, compiled)
            result[f"{kind}_compiled_vs_eager"] = result[kind]["step_s"] / result[f"{kind}_compiled"]["step_s"]
    result["packed_vs_single"] = result["packed"]["tflops_per_gpu"] / result["single"]["tflops_per_gpu"]
    if mesh.ring > 1:
        result["work_per_rank_max_vs_mean"] = placement_balance(mix, mesh.ring)
    return result


def placement_balance(mix: list[list[int]], ring: int) -> dict:
    """Busiest ring rank's attention work over the mean, per row, under zigzag and Note [Document placement]."""
    out = {}
    placements = {"zigzag": lambda b: zigzag_layout(b[-1], ring), "documents": lambda b: document_layout(b, ring)}
    for name, place in placements.items():
        ratios = []
        for row in mix:
            bounds = [0, *torch.tensor(row).cumsum(0).tolist()]
            work = attention_work(bounds, place(bounds))
            ratios.append(max(work) * ring / sum(work))
        out[name] = dict(mean=sum(ratios) / len(ratios), max=max(ratios))
    return out


def attention_only(args, mix, device) -> dict:
    """One layer's attention, forward + backward, on the first packed row, per DENSE_MIN_BLOCK; and one document."""
    settings = SHAPES[args.shape]
    heads, kv_heads = settings["num_attention_heads"], settings["num_key_value_heads"]
    dim = settings["hidden_size"] // heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length, row = sum(mix[0]), mix[0]
    q = torch.randn(1, heads, length, dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    results = {}
    for name, documents, threshold in [("one_document", [length], 0)] + [
            (f"packed_dense_min_{t}", row, t) for t in args.dense_min]:
        boundaries = [[0, *torch.tensor(documents).cumsum(0).tolist()]]
        varlen.DENSE_MIN_BLOCK = threshold * threshold if threshold >= 0 else math.inf
        ring_plan._cached_plan.cache_clear()

        def step():
            ring_attention(None, q, k, v, scale=dim**-0.5, boundaries=boundaries).sum().backward()

        step()
        timing = timed(step, args.repeats)
        flops = 3.5 * sum(4 * n * n * heads * dim / 2 for n in documents)
        ran_varlen = device.type == "cuda" and threshold != 0 and not varlen._varlen_refused
        results[name] = dict(**timing.fields("step"), tflops=flops / timing.median / 1e12, varlen_kernel=ran_varlen)
    return results


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b", help=f"one of {sorted(SHAPES)}")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--length", type=int, default=131072, help="tokens per row")
    parser.add_argument("--rows", type=int, default=1, help="rows per step (the batch)")
    parser.add_argument("--shortest", type=int, default=512)
    parser.add_argument("--longest", type=int, default=131072)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layouts", nargs="+", default=["ulysses", "ring"], help="with sp > 1: ulysses, ring")
    parser.add_argument("--memory", choices=["all", "none"], default="all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention", action="store_true", help="time one layer's attention instead of the model")
    parser.add_argument("--placement", type=int, nargs="+", metavar="RING", default=None,
                        help="only count the attention work per ring rank of the mix (no model, no GPU)")
    parser.add_argument("--dense-min", type=int, nargs="+", default=[0, 1024, 2048, 4096, -1],
                        help="--attention: √DENSE_MIN_BLOCK values to try (0: no groups, -1: every call grouped)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time torch.compile(model, backend=BACKEND) (e.g. inductor; aot_eager on CPU)")
    parser.add_argument("--no-placement", action="store_true",
                        help="keep zigzag for packed rows on a ring (what Note [Document placement] gains)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    mix = document_mix(args.rows, args.length, args.shortest, args.longest, args.seed)
    record = dict(bench="bench_packed", shape=args.shape, layers=args.layers or "full", length=args.length,
                  rows=args.rows, shortest=args.shortest, longest=args.longest, seed=args.seed, world=world,
                  memory=args.memory, placement=not args.no_placement, mix=describe(mix), **machine())
    if args.no_placement:
        apply_module._place_documents = lambda state, kwargs, labels: (kwargs, labels)
    if args.placement:
        record["placement"] = {str(ring): placement_balance(mix, ring) for ring in args.placement}
        table = {f"ring {ring} {name}": value for ring, row in record["placement"].items() for name, value in row.items()}
    elif args.attention:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        record["attention"] = attention_only(args, mix, device)
        table = record["attention"]
    else:
        meshes = {"single": longseq.init_mesh(sp=1)} if world == 1 else {
            name: longseq.init_mesh(sp=world, ring=1 if name == "ulysses" else world) for name in args.layouts}
        record["results"] = {name: run_layout(args, mesh, mix) for name, mesh in meshes.items()}
        table = {name: dict(packed_tflops=r["packed"]["tflops_per_gpu"], single_tflops=r["single"]["tflops_per_gpu"],
                            packed_vs_single=r["packed_vs_single"],
                            **{k: v for k, v in r.items() if k.endswith("compiled_vs_eager")})
                 for name, r in record["results"].items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        for name, row in table.items():
            print(f"{name:<28}", "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()), flush=True)
        write_record("bench_packed", record)
    return record


if __name__ == "__main__":
    main()
