"""The lean rotary embedding (memory/rotary.py, Note [Lean rotary backward]) against transformers' own, on q and k
of the Llama-3.1-8B shape (32 query heads, 8 K/V heads of 128) in bf16: bitwise equality of the outputs and
gradients, the backward's peak memory beyond what exists before it (in q's size), and forward + backward time.

    python -m bench.bench_rotary --lengths 65536 262144                 # one GPU
    python -m bench.bench_rotary --lengths 257 --device cpu --repeats 1  # CPU smoke run (no memory figures)

Prints a table and one JSON line (appended to bench/results/bench_rotary.jsonl).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from bench.common import machine, write_record
from longseq.memory.rotary import lean_apply_rotary_pos_emb


def _inputs(length: int, device: str) -> list[torch.Tensor]:
    """q, k as transposed views of batch × length × heads × dim (as the models make them), cos, sin, gradients."""
    torch.manual_seed(0)
    q = torch.randn(1, length, 32, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, length, 8, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    angles = torch.randn(1, length, 64, device=device) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1).bfloat16() for f in (torch.cos, torch.sin))
    return [q, k, cos, sin, torch.randn_like(q), torch.randn_like(k)]


def _run(fn, q, k, cos, sin, dq_out, dk_out, device: str) -> tuple[list[torch.Tensor], float | None, float]:
    """Outputs and gradients, the backward's peak beyond its start in q's size (CUDA only, else None), seconds."""
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = fn(q, k, cos, sin)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    torch.autograd.backward(outputs, (dq_out, dk_out))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated() - base) / q.nbytes if cuda else None
    return [*(o.detach() for o in outputs), q.grad, k.grad], extra, seconds


def measure(length: int, device: str, repeats: int) -> dict:
    inputs = _inputs(length, device)
    functions = {"transformers": apply_rotary_pos_emb, "lean": lean_apply_rotary_pos_emb(apply_rotary_pos_emb)}
    results, row = {}, dict(length=length)
    for name, fn in functions.items():
        runs = [_run(fn, *inputs, device) for _ in range(repeats + 1)]  # the first is a warm-up
        results[name] = runs[-1][0]
        row[f"{name}_backward_extra_q"] = runs[-1][1]
        row[f"{name}_ms"] = 1000 * min(seconds for _, _, seconds in runs[1:] or runs)
    row["bitwise_equal"] = all(torch.equal(a, b) for a, b in zip(results["transformers"], results["lean"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [measure(n, args.device, args.repeats) for n in args.lengths]
    print(f"{'length':>8} {'bitwise':>8} {'hf extra (q)':>13} {'lean extra (q)':>15} {'hf ms':>8} {'lean ms':>8}")
    for r in rows:
        hf, lean = (f"{x:.2f}" if x is not None else "-" for x in (r["transformers_backward_extra_q"],
                                                                    r["lean_backward_extra_q"]))
        print(f"{r['length']:>8} {str(r['bitwise_equal']):>8} {hf:>13} {lean:>15} {r['transformers_ms']:>8.2f} "
              f"{r['lean_ms']:>8.2f}")
    write_record("bench_rotary", dict(machine=machine(), rows=rows))


if __name__ == "__main__":
    main()
