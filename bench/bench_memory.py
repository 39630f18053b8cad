"""GPU memory, host memory and step time of one training step (forward + backward, no optimizer) on one GPU, per
memory variant or per lever of issue 13.

    python -m bench.bench_memory --variant all --lengths 16384 32768            # one GPU
    python -m bench.bench_memory --levers default no_fuse --layers 2 --lengths 65536 131072 262144 \
        --timed-lengths 65536 262144 --cap-gib 79                              # one GPU: levers side by side
    python -m bench.bench_memory --variant all --layers 32 --lengths 65536 131072 262144 131072 --timed-steps 0
                                                                               # one GPU: host arena over lengths
    python -m bench.bench_memory --variant hf --lengths 8192 --layers 4 --device cpu   # CPU smoke run
    python -m bench.bench_memory --levers default k2 --shape tiny --lengths 256 512 --device cpu   # CPU smoke run

Variants: hf (transformers + gradient checkpointing, its own loss), tiled_loss, tiled_mlp (each on top of
gradient checkpointing), offload (longseq's checkpointing with host offload), all (the three together).
Levers (--levers): the default MemoryConfig and one change to it each (LEVERS below; `before` switches off every
lever of issue 13 that has a knob). Each lever builds its own model; lengths run in order in one process.
--ballast-layers N allocates the weights and gradients of N more decoder layers as one idle tensor, so a shallow
model stands for a deep one when checking the longest length that fits (the peak of an offloaded step does not
grow with depth otherwise; bench_memory measures that too).
Per length: GPU peak (max allocated, max reserved), host bytes the offloader held at peak, its arena (Note [Host
arena]) and budget, the process's resident memory now and at its peak (VmRSS, VmHWM: pinned memory included), and
with --timed-steps the time of a step after the measured one (at --timed-lengths only, when given). Slopes between
the first and last length that fit give KiB per token. Each run prints a table and ends with one JSON line per
variant (also appended to bench/results/bench_memory.jsonl).
"""

from __future__ import annotations

import argparse
import gc

import torch

import longseq
from bench.common import build_model, machine, model_flops, peak_gib, reset_peak, timed, write_record
from longseq.memory import offload_stats

VARIANTS = {
    "hf": None,
    "tiled_loss": dict(tiled_mlp=False, tiled_loss=True, offload_checkpoints=False),
    "tiled_mlp": dict(tiled_mlp=True, tiled_loss=False, offload_checkpoints=False),
    "offload": dict(tiled_mlp=False, tiled_loss=False, offload_checkpoints=True),
    "all": dict(tiled_mlp=True, tiled_loss=True, offload_checkpoints=True),
}

# Issue 13's levers as changes to the default MemoryConfig (every feature on).
LEVERS = {
    "default": {},
    "heads_all": dict(attention_heads_per_call=1 << 16),  # one kernel call for all heads (no head groups)
    "heads_1": dict(attention_heads_per_call=1),  # one query head per kernel call
    "no_fuse": dict(fuse_norms=False),  # norm outputs kept for backward by their readers
    "prefetch_early": dict(prefetch_after_attention=False),  # checkpoints come back one layer ahead
    "no_cache": dict(cache_attention=False),  # attention recomputed in backward
    "k2": dict(layers_per_checkpoint=2),  # one offloaded checkpoint per 2 layers
    "before": dict(attention_heads_per_call=1 << 16, fuse_norms=False, prefetch_after_attention=False),
}


def prepare(variant: str, shape: str, layers: int | None, device: str, fields: dict | None = None):
    """The model of `variant`, its MemoryConfig with `fields` changed (longseq variants only)."""
    model = build_model(shape, layers, device)
    settings = VARIANTS[variant]
    if settings is None or not settings["offload_checkpoints"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings is not None:
        longseq.apply(model, memory=longseq.MemoryConfig(**settings, **(fields or {})))
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


def _process_memory() -> dict:
    """This process's resident memory now and at its peak, GiB (VmRSS, VmHWM; pinned host memory counts)."""
    fields = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[f"host_{name[2:].lower()}_gib"] = int(value.split()[0]) / 2**20
    except OSError:
        pass
    return fields


PER_STEP_COUNTS = ("attention_not_kept", "checkpoints_on_device")
"""OffloadStats counts since the model was wrapped; a record gives the step's own (the difference across it)."""


def _counts(model) -> dict:
    try:
        stats = offload_stats(model)
    except ValueError:  # no checkpoint offload in this variant
        return {}
    return {name: getattr(stats, name) for name in PER_STEP_COUNTS}


def _host_fields(model, counts_before: dict) -> dict:
    """What the offloader held on the host at this step's peak, its arena and budget (GiB), and what the step itself
    did not keep (`counts_before`: _counts before the step)."""
    try:
        stats = offload_stats(model)
    except ValueError:
        return {}
    fields = dict(offloaded_peak_gib=stats.peak_bytes / 2**30, arena_gib=stats.arena_bytes / 2**30,
                  arena_peak_gib=stats.arena_peak_bytes / 2**30)
    fields.update({name: getattr(stats, name) - counts_before.get(name, 0) for name in PER_STEP_COUNTS})
    if stats.budget_bytes is not None:
        fields["host_budget_gib"] = stats.budget_bytes / 2**30
    stats.peak_bytes = 0
    return fields


def measure(model, variant: str, length: int, device: str, timed_steps: int) -> dict:
    """One length: a step whose peaks are recorded, then `timed_steps` timed steps."""
    step = step_fn(model, variant, length, device)
    row = dict(length=length)
    try:
        reset_peak()
        counts_before = _counts(model)
        row["loss"] = float(step())
        row["peak_gib"] = peak_gib()
        if torch.cuda.is_available():
            row["reserved_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
        row.update(_host_fields(model, counts_before), **_process_memory())
        if timed_steps:
            row.update(timed(step, timed_steps).fields("step"))
            row["tokens_per_s"] = length / row["step_s"]
            row["tflops"] = model_flops(length, model.config) / row["step_s"] / 1e12
    except torch.OutOfMemoryError:
        row["oom"] = True
    model.zero_grad(set_to_none=False)
    return row


def slopes(rows: list[dict]) -> dict:
    """KiB per token between the first and last length that fit: GPU peak, and host bytes the offloader held."""
    fits = [r for r in rows if "peak_gib" in r]
    if len(fits) < 2 or fits[0]["length"] == fits[-1]["length"]:
        return {}
    a, b = min(fits, key=lambda r: r["length"]), max(fits, key=lambda r: r["length"])
    span = (b["length"] - a["length"]) / 2**20  # GiB per token → KiB per token: × 2**30 / 2**10
    per_token_gib = (b["peak_gib"] - a["peak_gib"]) / (b["length"] - a["length"])
    result = dict(kib_per_token=(b["peak_gib"] - a["peak_gib"]) / span,
                  intercept_gib=a["peak_gib"] - per_token_gib * a["length"])
    if "offloaded_peak_gib" in a:
        result["host_kib_per_token"] = (b["offloaded_peak_gib"] - a["offloaded_peak_gib"]) / span
    return result


def run(args, variant: str, label: str, fields: dict | None) -> dict:
    model = prepare(variant, args.shape, args.layers, args.device, fields)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    ballast = torch.empty(2 * layer_bytes * args.ballast_layers, dtype=torch.uint8, device=args.device)
    fixed_gib = (2 * sum(p.numel() * p.element_size() for p in model.parameters()) + ballast.numel()) / 2**30
    rows = []
    for length in args.lengths:
        timed_steps = args.timed_steps if not args.timed_lengths or length in args.timed_lengths else 0
        rows.append(measure(model, variant, length, args.device, timed_steps))
        print(f"{label:>14} {length:>8} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in rows[-1].items() if k != "length"), flush=True)
    record = dict(bench="bench_memory", variant=variant, lever=label if fields is not None else None,
                  memory=fields, shape=args.shape, layers=model.config.num_hidden_layers,
                  ballast_layers=args.ballast_layers, fixed_gib=fixed_gib, cap_gib=args.cap_gib, rows=rows,
                  **slopes(rows), **machine())
    write_record("bench_memory", record)
    del model, ballast
    gc.collect()  # the model's wrapped forwards are bound methods of it: a cycle, freed only by the collector
    reset_peak()
    return record


def lever_table(records: list[dict], timed_lengths: list[int]) -> str:
    """KiB per token (GPU, host) and step time per lever, the time as a ratio to the default's."""
    base = {r["length"]: r.get("step_s") for r in records[0]["rows"]} if records else {}
    head = "| lever | GPU KiB/token | host KiB/token | " + " | ".join(f"step {_tokens(n)} s (× default)"
                                                                      for n in timed_lengths) + " |"
    lines = [head, "|" + " --- |" * (3 + len(timed_lengths))]
    for record in records:
        by_length = {r["length"]: r for r in record["rows"]}
        cells = [record["lever"], f"{record.get('kib_per_token', float('nan')):.1f}",
                 f"{record.get('host_kib_per_token', float('nan')):.1f}"]
        for n in timed_lengths:
            seconds = by_length.get(n, {}).get("step_s")
            ratio = f" ({seconds / base[n]:.3f})" if seconds and base.get(n) else ""
            cells.append(f"{seconds:.2f}{ratio}" if seconds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _value(text: str):
    return {"True": True, "False": False, "None": None}.get(text, int(text) if text.lstrip("-").isdigit() else text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="all")
    parser.add_argument("--levers", nargs="+", choices=sorted(LEVERS), help="run these levers (variant all)")
    parser.add_argument("--memory-field", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="MemoryConfig fields for every longseq run, e.g. host_memory_gib=100")
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--timed-lengths", type=int, nargs="*", default=[],
                        help="time steps only at these lengths (default: at every length)")
    parser.add_argument("--ballast-layers", type=int, default=0)
    parser.add_argument("--cap-gib", type=float, default=None, help="cap this process's GPU memory (emulate a card)")
    parser.add_argument("--timed-steps", type=int, default=1, help="0: one step, memory only")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.cap_gib and args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    extra = {k: _value(v) for k, v in (item.split("=", 1) for item in args.memory_field)}
    if not args.levers:
        run(args, args.variant, args.variant, extra or None)
        return
    records = [run(args, "all", name, {**LEVERS[name], **extra}) for name in args.levers]
    print(lever_table(records, args.timed_lengths or args.lengths))


if __name__ == "__main__":
    main()
