"""Exactness of the CUDA/NCCL paths that CPU tests cannot reach: attention kernels, ring/Ulysses/hybrid over NCCL,
the memory features (pinned offload on a side stream) and Gated DeltaNet hybrids (linear_checks.py), each against an
unsharded fp32 reference.

    python -m pytest -q tests/gpu                                   # what CI would run if it had GPUs (it skips)
    torchrun --nproc-per-node 4 -m tests.gpu.nccl_checks --record   # 4 GPUs (or 2: sp = the world size, ring sizes
                                                                    # up to it); --record: bench/results/check_gpu.jsonl

Prints one line per check with the max error and its tolerance, and ends with one JSON line; test_cuda_paths.py runs
this under torchrun and fails on any check over its tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist

import longseq
from bench.common import machine, write_record
from longseq.parallel import kernels
from longseq.parallel.balance import portion_positions
from longseq.parallel.local import causal_attention
from longseq.parallel.ring import ring_attention
from longseq.parallel.ulysses import heads_to_sequence_split, kv_replication, sequence_to_heads_split
from tests.gpu.linear_checks import check_linear_attention

def report(results: list[dict], name: str, error: float, tolerance: float, **extra) -> None:
    """Append one check's outcome to `results` and print it (rank 0, or the only process)."""
    ok = error <= tolerance
    results.append(dict(check=name, error=error, tolerance=tolerance, ok=ok, **extra))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{'ok ' if ok else 'BAD'} {name:<48} max error {error:.3e} (tolerance {tolerance:.1e}) {extra or ''}",
              flush=True)


def check_kernels(results: list[dict]) -> None:
    """Each CUDA SDPA backend's block forward and backward (output and log-sum-exp contract), and flex's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    for causal in (True, False):
        ref_q, ref_k, ref_v = (t.float().requires_grad_() for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(ref_q, ref_k, ref_v, is_causal=causal, scale=0.1)
        ref.backward(dout.float())
        for backend in kernels.CUDA_BACKENDS:
            kernels._chosen.clear()
            kernels._chosen[("forward", q.dtype)] = kernels._chosen[("backward", q.dtype)] = backend
            try:
                out, lse = kernels.block_forward(q, k, v, causal=causal, scale=0.1)
                dq, dk, dv = kernels.block_backward(dout, q, k, v, out, lse, causal=causal, scale=0.1)
            except RuntimeError as error:
                report(results, f"kernel {backend} causal={causal}", float("inf"), 0, failure=str(error)[:200])
                continue
            error = max((a.float() - b).abs().max().item() for a, b in
                        ((out, ref), (dq, ref_q.grad), (dk, ref_k.grad), (dv, ref_v.grad)))
            report(results, f"kernel {backend} causal={causal}", error, 5e-2)
        out, lse = kernels.block_forward(q, k, v, causal=causal, scale=0.1, kernel="flex")
        grads = kernels.block_backward(dout, q, k, v, out, lse, causal=causal, scale=0.1, kernel="flex")
        error = max((a.float() - b).abs().max().item() for a, b in
                    zip((out, *grads), (ref, ref_q.grad, ref_k.grad, ref_v.grad)))
        report(results, f"kernel flex causal={causal}", error, 5e-2)
    kernels._chosen.clear()


def check_attention(results: list[dict], mesh, length: int, boundaries, kernel: str = "sdpa") -> None:
    """Ring/hybrid/Ulysses attention (bf16, NCCL) vs the whole sequence's attention in fp32 on one GPU."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 8, length, 128, device="cuda"), torch.randn(2, 2, length, 128, device="cuda"), \
        torch.randn(2, 2, length, 128, device="cuda")
    dout = torch.randn(2, 8, length, 128, device="cuda")
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = causal_attention(*full, scale=0.088, boundaries=boundaries)
    ref.backward(dout)
    per_rank = length // mesh.ring
    portion = portion_positions(length, mesh.ring, mesh.ring_rank).cuda()
    piece = portion.view(mesh.ulysses, -1)[mesh.ulysses_rank]
    local = [t.detach()[:, :, piece].bfloat16().requires_grad_() for t in (q, k, v)]
    sq, sk, sv = heads_to_sequence_split(mesh.ulysses_group, *local, replicate_kv=kv_replication(8, 2, mesh.ulysses))
    if mesh.ring > 1:
        out = ring_attention(mesh.ring_group, sq, sk, sv, scale=0.088, boundaries=boundaries, kernel=kernel)
    else:
        out = causal_attention(sq, sk, sv, scale=0.088, boundaries=boundaries)
    out = sequence_to_heads_split(mesh.ulysses_group, out.transpose(1, 2)).transpose(1, 2)
    out.backward(dout[:, :, piece].bfloat16())
    error = max((out.float() - ref[:, :, piece]).abs().max().item(),
                *((a.grad.float() - b.grad[:, :, piece]).abs().max().item() for a, b in zip(local, full)))
    assert per_rank * mesh.ring == length
    # flex's recompute backward rounds each block's share of the gradient to bf16 once more (kernels.py).
    report(results, f"attention u={mesh.ulysses} r={mesh.ring} S={length} packed={boundaries is not None} {kernel}", error,
           8e-2 if kernel == "flex" else 6e-2)


def check_model(results: list[dict], mesh, memory, attn: str = "sdpa") -> None:
    """A small Llama on the GPU, sharded (and memory features) vs the plain model: fp32 for Ulysses; bf16 (relative
    to the plain model in bf16) for ring, whose CUDA kernels take bf16/fp16 only."""
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float32 if mesh.ring == 1 else torch.bfloat16
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).train()
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 1999), generator=g).cuda()
    positions = torch.cat([torch.arange(700), torch.arange(1299)]).cuda()[None].expand(2, -1)
    data = dict(input_ids=ids, labels=ids, position_ids=positions)
    ref_loss = reference(**data, use_cache=False).loss
    ref_loss.backward()
    longseq.apply(model, mesh, memory)
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh), mesh)
    loss.backward()
    longseq.sync_gradients(model, mesh)
    ref = dict(reference.named_parameters())
    error = max((p.grad - ref[n].grad).abs().max().item() / ref[n].grad.abs().max().item()
                for n, p in model.named_parameters())
    error = max(error, abs(loss.item() - ref_loss.item()))
    stats = longseq.memory.offload_stats(model).peak_bytes if memory and memory.offload_checkpoints else 0
    report(results, f"model u={mesh.ulysses} r={mesh.ring} memory={memory is not None} {attn} {dtype}", error,
           1e-3 if dtype == torch.float32 else 5e-2, host_peak_bytes=stats)


def check_meshes(results: list[dict]) -> None:
    """Every layout the world size allows (ring 1, 2, 4; Ulysses for the rest), attention alone and a whole model."""
    world = dist.get_world_size()
    for ring in (r for r in (1, 2, 4) if r <= world):
        mesh = longseq.init_mesh(sp=world, ring=ring)
        for kernel in ("sdpa", "flex") if ring > 1 else ("sdpa",):
            for boundaries in (None, [[0, 3000, 3001, 16384], [0, 9000, 16384]]):
                check_attention(results, mesh, 16384, boundaries, kernel)
        check_model(results, mesh, None)
        check_model(results, mesh, longseq.MemoryConfig(tile_tokens=300, offload_min_bytes=0))
        if ring > 1:
            check_model(results, mesh, longseq.MemoryConfig(tile_tokens=300, offload_min_bytes=0),
                        attn="flex_attention")
        check_linear_attention(results, mesh, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=None, help="rank 0 writes the checks here as JSON")
    parser.add_argument("--record", action="store_true", help="append the record to bench/results/check_gpu.jsonl")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    results: list[dict] = []
    check_kernels(results)
    check_meshes(results)
    if dist.get_rank() == 0:
        record = dict(bench="check_gpu", results=results, all_ok=all(r["ok"] for r in results), **machine())
        if args.results:
            with open(args.results, "w") as fh:
                json.dump(record, fh)
        if args.record:
            write_record("check_gpu", record)
        else:
            print(json.dumps(record), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
