"""The lm_head + cross-entropy alone, forward + backward, per implementation and tile size (Llama-3.1-8B's head).

    python -m bench.bench_loss --lengths 32768 65536            # one GPU
    python -m bench.bench_loss --tiny                           # CPU, tiny shapes: runs end to end, no record

Contenders: transformers' own loss (the full logits, upcast to fp32, as `ForCausalLMLoss`), longseq's tiled loss at
several tile sizes (Note [Tiled loss]: the weight gradient accumulates in fp32 once per tile, so the tile count
sets its memory traffic), and Liger's fused linear cross-entropy where installed. Prints a table and ends with one
JSON line (also appended to bench/results/bench_loss.jsonl).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import machine, peak_gib, reset_peak, timed, write_record
from longseq.memory.tiled_loss import loss_tile_tokens, tiled_cross_entropy_sum


def hf_loss(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def tiled(tile_mib):
    def loss(hidden, weight, labels):
        return tiled_cross_entropy_sum(hidden, weight, labels, tile_memory_mib=tile_mib)[0]
    return loss


def liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, labels: fused(weight, hidden, labels)


def contenders(tiles):
    out = {"hf": hf_loss, **{f"tiled-{t}MiB": tiled(t) for t in tiles}}
    fused = liger()
    if fused is not None:
        out["liger"] = fused
    return out


def measure(loss_fn, tokens, hidden_size, vocab, device, dtype, repeats):
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)

    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        return float(loss.detach())

    step()
    reset_peak()
    value = step()
    return dict(loss_per_token=value / tokens, peak_gib=peak_gib(), **timed(step, repeats).fields("step"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 1024, 4096], help="tile_memory_mib values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden_size, vocab = (64, 512) if args.tiny else (4096, 128256)
    lengths = [256, 512] if args.tiny else args.lengths
    tiles = [1, 4] if args.tiny else args.tiles
    rows = []
    print(f"{'contender':>14} {'tokens':>7} {'tile tok':>8} {'step s':>8} {'peak GiB':>9} {'loss/tok':>9}")
    for tokens in lengths:
        for name, fn in contenders(tiles).items():
            tile = loss_tile_tokens(vocab, int(name.split("-")[1][:-3])) if name.startswith("tiled") else None
            row = dict(contender=name, tokens=tokens, tile_tokens=tile,
                       **measure(fn, tokens, hidden_size, vocab, device, dtype, args.repeats))
            rows.append(row)
            print(f"{name:>14} {tokens:>7} {str(tile or '-'):>8} {row['step_s']:>8.4f} {row['peak_gib']:>9.2f} "
                  f"{row['loss_per_token']:>9.4f}", flush=True)
    record = dict(bench="bench_loss", hidden=hidden_size, vocab=vocab, tiny=args.tiny, **machine(), rows=rows)
    if not args.tiny:
        write_record("bench_loss", record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
