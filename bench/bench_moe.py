"""Mixture-of-experts decoders at long lengths: one small model of each family (Qwen3-MoE, Mixtral, GPT-OSS; real
layer shapes, fewer layers, random weights), a full training step (forward + backward, router loss on) with every
memory feature: GPU memory per token, tokens/s, and the first-step loss against the unsharded model.

    python -m bench.bench_moe --family gpt_oss --lengths 65536 131072 262144                 # one GPU
    torchrun --nproc-per-node 2 -m bench.bench_moe --family qwen3_moe --lengths 65536 131072 262144
    python -m bench.bench_moe --tiny --family mixtral                                       # CPU, tiny shapes

First the plain transformers model (no longseq; GPT-OSS on its eager attention) computes the loss of one batch of
--reference-length tokens; then longseq (sp = the number of processes) computes the same batch's loss, and its
difference is recorded (bf16, random weights). Then each length runs one step (its loss, peak GPU memory) and
--repeats timed steps. Prints a table and ends with one JSON line, also appended to bench/results/bench_moe.jsonl
(--tiny: printed only).
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import transformers

import longseq
from bench.common import machine, peak_gib, reset_peak, timed, write_record

# Layer shapes of Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b; the depth is --layers.
SHAPES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000)),
    "gpt_oss": ("GptOssConfig", dict(
        hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, vocab_size=201088, sliding_window=128, max_position_embeddings=131072)),
}
TINY = dict(hidden_size=64, intermediate_size=32, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=48)


def build(family: str, layers: int, device: torch.device, tiny: bool, seed: int = 0):
    """A random-weight model of the family (the same weights for the same seed), router loss on."""
    name, shape = SHAPES[family]
    settings = {**shape, **({k: v for k, v in TINY.items() if k in shape or k == "sliding_window"} if tiny else {})}
    if family == "mixtral":
        settings.pop("sliding_window", None)
    settings.setdefault("max_position_embeddings", 1 << 22)
    config = getattr(transformers, name)(**settings, num_hidden_layers=layers, output_router_logits=True)
    torch.manual_seed(seed)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="eager" if family == "gpt_oss" else "sdpa")
    return model.train()


def make_batch(length: int, vocab: int, device: torch.device) -> dict:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(length, device=device)[None]}


def reference_loss(args, device) -> float:
    """The plain transformers model's loss (cross-entropy + router loss) of the reference batch, no longseq."""
    model = build(args.family, args.layers, device, args.tiny)
    with torch.no_grad():
        loss = model(**make_batch(args.reference_length, model.config.vocab_size, device), use_cache=False).loss
    del model
    _free()
    return float(loss)


def measure(model, mesh, data: dict, repeats: int) -> dict:
    local = longseq.shard_batch(data, mesh)

    def step():
        out = model(**local, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=False)
        return out

    reset_peak()
    out = step()
    peak = torch.tensor([peak_gib()], device=mesh.device)
    if mesh.world_size > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    timing = timed(step, repeats).fields("step") if repeats else dict(step_s=float("nan"))
    tokens = data["input_ids"].numel()
    return dict(tokens=tokens, loss=float(out.loss.detach()), aux_loss=float(out.aux_loss.detach()),
                peak_gib=peak.item(), tokens_per_s_per_gpu=tokens / timing["step_s"] / mesh.world_size, **timing)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _mesh(model, device) -> longseq.Mesh:
    if "WORLD_SIZE" not in os.environ:
        return longseq.Mesh(device=device)
    return longseq.init_mesh(sp=dist.get_world_size(), model=model)


def run(args) -> dict:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    reference = reference_loss(args, device)
    model = build(args.family, args.layers, device, args.tiny)
    mesh = _mesh(model, device)
    memory = longseq.MemoryConfig(tile_tokens=64 if args.tiny else None)
    longseq.apply(model, mesh, memory, attention="sdpa")
    rows = [measure(model, mesh, make_batch(args.reference_length, model.config.vocab_size, device), 0)]
    rows += [measure(model, mesh, make_batch(length, model.config.vocab_size, device), args.repeats)
             for length in args.lengths]
    for before, after in zip(rows[1:], rows[2:]):
        after["kib_per_token_since_previous"] = (after["peak_gib"] - before["peak_gib"]) * 2**20 / (
            after["tokens"] - before["tokens"])
    return dict(bench="bench_moe", family=args.family, layers=args.layers, tiny=args.tiny, sp=mesh.sp,
                ulysses=mesh.ulysses, ring=mesh.ring, reference_length=args.reference_length,
                reference_loss=reference, check_loss=rows[0]["loss"],
                loss_diff_vs_unsharded=abs(rows[0]["loss"] - reference), results=rows[1:],
                experts_implementation=getattr(model.config, "_experts_implementation", None), **machine())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(SHAPES), required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", help="default 65536 131072 262144 (--tiny: 256 512)")
    parser.add_argument("--reference-length", type=int, help="default 4096 (--tiny: 128)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU run end to end")
    args = parser.parse_args(argv)
    args.lengths = args.lengths or ([256, 512] if args.tiny else [65536, 131072, 262144])
    args.reference_length = args.reference_length or (128 if args.tiny else 4096)
    record = run(args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{'tokens':>8} {'loss':>9} {'aux':>7} {'peak GiB':>9} {'KiB/token':>10} {'step s':>8} {'tok/s/GPU':>10}")
        for row in record["results"]:
            print(f"{row['tokens']:>8} {row['loss']:>9.4f} {row['aux_loss']:>7.4f} {row['peak_gib']:>9.2f} "
                  f"{row.get('kib_per_token_since_previous', float('nan')):>10.1f} {row['step_s']:>8.2f} "
                  f"{row['tokens_per_s_per_gpu']:>10.0f}")
        print(f"loss at {args.reference_length} tokens: longseq {record['check_loss']:.5f}, unsharded transformers "
              f"{record['reference_loss']:.5f} (difference {record['loss_diff_vs_unsharded']:.2e})")
        if args.tiny:
            import json

            print(json.dumps(record, sort_keys=True), flush=True)
        else:
            write_record("bench_moe", record)
    if dist.is_initialized():
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
