"""End-to-end training step (forward + backward, no optimizer) of a Llama shape under sequence parallelism, per
layout (Ulysses, ring, hybrid), beside the same model on one GPU.

    torchrun --nproc-per-node 4 -m bench.bench_sp --length 65536 --reference-length 16384

Every rank holds the whole model (no FSDP here: this measures the sequence dimension). The reference runs the
unsharded model on one GPU at --reference-length; each layout runs that same batch once more (its loss must equal
the reference's within bf16 tolerance) and then --length tokens for memory and speed. Prints a table and ends with
one JSON line (also appended to bench/results/bench_sp.jsonl).
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist

import longseq
from bench.common import build_model, machine, model_flops, peak_gib, reset_peak, timed, write_record

LAYOUTS = {"ulysses": 1, "hybrid": 2, "ring": None}


def make_batch(length: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (1, length), generator=g).cuda()
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(length, device="cuda")[None]}


def measure(model, mesh, data, repeats: int) -> dict:
    local = longseq.shard_batch(data, mesh)

    def step():
        loss = longseq.causal_lm_loss(model, local, mesh)
        loss.backward()
        model.zero_grad(set_to_none=False)
        return loss.detach()

    reset_peak()
    loss = float(step())
    peak = torch.tensor([peak_gib()], device="cuda")
    if mesh.world_size > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    timing = timed(step, repeats).fields("step") if repeats else dict(step_s=float("nan"))
    seconds = timing["step_s"]
    tokens = data["input_ids"].numel()
    return dict(tokens=tokens, loss=loss, peak_gib=peak.item(), **timing,
                tokens_per_s_per_gpu=tokens / seconds / mesh.world_size,
                tflops_per_gpu=model_flops(tokens, model.config) / seconds / mesh.world_size / 1e12)


def run_layout(args, mesh) -> dict:
    model = build_model(args.shape, args.layers)
    memory = longseq.MemoryConfig() if args.memory == "all" else None
    if memory is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    longseq.apply(model, mesh, memory)
    check = measure(model, mesh, make_batch(args.reference_length, model.config.vocab_size), repeats=0)
    result = measure(model, mesh, make_batch(args.length, model.config.vocab_size), repeats=args.repeats)
    result["check_loss"] = check["loss"]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--reference-length", type=int, default=16384)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--memory", choices=["all", "none"], default="all")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = dist.get_world_size()
    rank0 = dist.get_rank() == 0
    results = {}
    single = longseq.Mesh(device=torch.device("cuda"))
    model = build_model(args.shape, args.layers)
    if args.memory == "all":
        longseq.apply(model, single, longseq.MemoryConfig())
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        longseq.apply(model, single)
    results["single_gpu"] = measure(model, single, make_batch(args.reference_length, model.config.vocab_size),
                                    args.repeats)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    for name in args.layouts:
        mesh = longseq.init_mesh(sp=world, ring=LAYOUTS[name] or world)
        results[name] = run_layout(args, mesh)
        results[name]["loss_diff_vs_single"] = abs(results[name]["check_loss"] - results["single_gpu"]["loss"])
        if rank0:
            print(name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
    if rank0:
        print("single_gpu", {k: round(v, 4) for k, v in results["single_gpu"].items()}, flush=True)
        write_record("bench_sp", dict(bench="bench_sp", shape=args.shape, layers=args.layers or "full",
                                      memory=args.memory, world=world, results=results, **machine()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
