"""GPU memory and step time of one training step (forward + backward, no optimizer) on one GPU, per memory variant.

    python -m bench.bench_memory --variant all --lengths 16384 32768            # one GPU
    python -m bench.bench_memory --variant hf --lengths 8192 --layers 4 --device cpu   # CPU smoke run

Variants: hf (transformers + gradient checkpointing, its own loss), tiled_loss, tiled_mlp (each on top of
gradient checkpointing), offload (longseq's checkpointing with host offload), all (the three together).
--ballast-layers N allocates the weights and gradients of N more decoder layers as one idle tensor, so a shallow
model stands for a deep one when checking the longest length that fits (the peak of an offloaded step does not
grow with depth otherwise; bench_memory measures that too).
Each run prints a table and ends with one JSON line (also appended to bench/results/bench_memory.jsonl).
"""

from __future__ import annotations

import argparse

import torch

import longseq
from bench.common import build_model, machine, model_flops, peak_gib, reset_peak, timed, write_record

VARIANTS = {
    "hf": None,
    "tiled_loss": dict(tiled_mlp=False, tiled_loss=True, offload_checkpoints=False),
    "tiled_mlp": dict(tiled_mlp=True, tiled_loss=False, offload_checkpoints=False),
    "offload": dict(tiled_mlp=False, tiled_loss=False, offload_checkpoints=True),
    "all": dict(tiled_mlp=True, tiled_loss=True, offload_checkpoints=True),
}


def prepare(variant: str, shape: str, layers: int | None, device: str):
    model = build_model(shape, layers, device)
    settings = VARIANTS[variant]
    if settings is None or not settings["offload_checkpoints"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings is not None:
        longseq.apply(model, memory=longseq.MemoryConfig(**settings))
    return model


def step_fn(model, variant: str, length: int, device: str):
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    data = {"input_ids": torch.randint(0, vocab, (1, length), generator=g).to(device)}
    data["labels"] = data["input_ids"]
    data["position_ids"] = torch.arange(length, device=device)[None]
    sharded = longseq.shard_batch(data, longseq.Mesh())

    def step():
        if VARIANTS[variant] is None:
            loss = model(**data, use_cache=False).loss
        else:
            loss = longseq.causal_lm_loss(model, sharded)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep grad buffers allocated: they are part of the fixed memory
        return loss.detach()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="all")
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--ballast-layers", type=int, default=0)
    parser.add_argument("--cap-gib", type=float, default=None, help="cap this process's GPU memory (emulate a card)")
    parser.add_argument("--timed-steps", type=int, default=1, help="0: one step, memory only")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.cap_gib and args.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    model = prepare(args.variant, args.shape, args.layers, args.device)
    layer = model.model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    ballast = torch.empty(2 * layer_bytes * args.ballast_layers, dtype=torch.uint8, device=args.device)
    fixed_gib = (2 * sum(p.numel() * p.element_size() for p in model.parameters()) + ballast.numel()) / 2**30
    rows = []
    for length in args.lengths:
        step = step_fn(model, args.variant, length, args.device)
        row = dict(length=length)
        try:
            reset_peak()
            row["loss"] = float(step())
            row["peak_gib"] = peak_gib()
            if args.timed_steps:
                row.update(timed(step, args.timed_steps).fields("step"))
                row["tokens_per_s"] = length / row["step_s"]
                row["tflops"] = model_flops(length, model.config) / row["step_s"] / 1e12
        except torch.OutOfMemoryError:
            row["oom"] = True
        model.zero_grad(set_to_none=False)
        rows.append(row)
        print(f"{args.variant:>10} {length:>8} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in row.items() if k != "length"), flush=True)
    fits = [r for r in rows if "peak_gib" in r]
    record = dict(bench="bench_memory", variant=args.variant, shape=args.shape,
                  layers=model.config.num_hidden_layers, ballast_layers=args.ballast_layers, fixed_gib=fixed_gib,
                  cap_gib=args.cap_gib, rows=rows, **machine())
    if len(fits) >= 2:
        (a, b) = fits[0], fits[-1]
        per_token = (b["peak_gib"] - a["peak_gib"]) * 2**30 / (b["length"] - a["length"])
        record["kib_per_token"] = per_token / 1024
        record["intercept_gib"] = a["peak_gib"] - per_token * a["length"] / 2**30
    write_record("bench_memory", record)


if __name__ == "__main__":
    main()
