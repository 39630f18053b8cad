"""Gated DeltaNet under sequence parallelism: Ulysses over heads against state passing, per GPU. Two parts:

- layer: one Gated DeltaNet layer (the family's real layer shape: Qwen3-Next's 16 key / 32 value heads × 128),
  forward + backward on this rank's S/P tokens; on one GPU also transformers' own layer (its torch path, or
  flash-linear-attention where installed) for comparison.
- model: a few layers of the family (3 Gated DeltaNet : 1 attention, dense MLP), a full training step with every
  memory feature on; the loss of a --reference-length batch against the same model unsharded on one GPU.

    torchrun --nproc-per-node 2 -m bench.bench_linear_attention --lengths 65536 131072 262144
    torchrun --nproc-per-node 1 -m bench.bench_linear_attention --lengths 65536 131072 262144
    torchrun --nproc-per-node 2 -m bench.bench_linear_attention --tiny        (CPU, gloo: runs end to end, no record)

Prints a table and ends with one JSON line (also appended to bench/results/bench_linear_attention.jsonl).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json

import torch
import torch.distributed as dist
import transformers

import longseq
from bench.common import machine, peak_gib, reset_peak, timed, write_record
from longseq.models.hybrid import gated_delta_nets

CONFIGS = {"qwen3_next": "Qwen3NextConfig", "qwen3_5": "Qwen3_5TextConfig", "olmo_hybrid": "OlmoHybridConfig"}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=8, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def build(family: str, layers: int, tiny: bool, device, dtype):
    """The family's default (released) shape with `layers` layers, 3 Gated DeltaNet to 1 attention (at least one
    attention layer), dense MLP."""
    types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)]
    types[-1] = "full_attention" if "full_attention" not in types else types[-1]  # OLMo-Hybrid needs one
    settings = dict(TINY) if tiny else {}
    settings.update(num_hidden_layers=layers, layer_types=types)
    if family == "qwen3_next":
        settings["num_experts"] = 0
    config = getattr(transformers, CONFIGS[family])(**settings)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def modes(world: int) -> list[str]:
    return ["heads", "state"] if world > 1 else ["heads"]


def layer_step(family, mode, mesh, length, args, device, dtype, plain=False):
    """Forward + backward of one Gated DeltaNet layer on this rank's tokens (plain: transformers' own, one GPU)."""
    model = build(family, 2, args.tiny, device, dtype)  # a Gated DeltaNet layer, then attention (not run)
    if not plain:
        longseq.apply(model, mesh, linear_attention=mode)
    net = gated_delta_nets(model)[0]
    local = longseq.shard_batch({"input_ids": torch.zeros(1, length, dtype=torch.long, device=device)}, mesh)
    hidden = torch.randn(1, local["input_ids"].shape[1], model.config.hidden_size, device=device, dtype=dtype,
                         requires_grad=True)
    extra = {} if plain else {"longseq_position_ids": local["position_ids"]}

    def step():
        net(hidden, **extra).float().square().mean().backward()

    return step


def model_step(model, mesh, length, device):
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    local = longseq.shard_batch({"input_ids": ids.to(device)}, mesh)

    def step():
        loss = longseq.causal_lm_loss(model, local, mesh)
        loss.backward()
        model.zero_grad(set_to_none=False)
        return float(loss.detach())

    return step


def measure(step, repeats: int, world: int, device) -> dict:
    reset_peak()
    first = step()  # the loss of a model step; None for a layer
    peak = torch.tensor([peak_gib()], device=device)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result = dict(peak_gib=peak.item(), **timed(step, repeats).fields("step"),
                  **({} if first is None else {"first_loss": first}))
    if dist.get_rank() == 0:  # as it comes: a later length that runs out of memory leaves these in the log
        print("measured", json.dumps(result), flush=True)
    return result


def run(args, world, device, dtype) -> list[dict]:
    rows = []
    mesh = longseq.init_mesh(sp=world) if world > 1 else longseq.Mesh(device=device)
    for length in args.lengths:
        for mode in modes(world) + (["transformers"] if world == 1 else []):
            step = layer_step(args.family, mode, mesh, length, args, device, dtype, plain=mode == "transformers")
            rows.append(dict(part="layer", mode=mode, tokens=length, **measure(step, args.repeats, world, device)))
            gc.collect()
    reference = build(args.family, args.layers, args.tiny, device, dtype)
    one_gpu = longseq.Mesh(device=device)
    reference_loss = model_step(longseq.apply(copy.deepcopy(reference), one_gpu, longseq.MemoryConfig()), one_gpu,
                                args.reference_length, device)()
    for mode in modes(world):
        model = copy.deepcopy(reference)
        longseq.apply(model, mesh, longseq.MemoryConfig(), linear_attention=mode)
        check = model_step(model, mesh, args.reference_length, device)()
        for length in args.lengths:
            result = measure(model_step(model, mesh, length, device), args.repeats, world, device)
            rows.append(dict(part="model", mode=mode, tokens=length, loss_diff_vs_one_gpu=abs(check - reference_loss),
                             **result))
        del model
        gc.collect()
    for row in rows:
        row["tokens_per_s_per_gpu"] = row["tokens"] / row["step_s"] / world
        row["gib_per_1k_tokens_per_gpu"] = row["peak_gib"] / (row["tokens"] / world) * 1024
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=list(CONFIGS), default="qwen3_next")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 262144])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reference-length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (gloo): a check that it runs")
    args = parser.parse_args()
    if args.tiny:
        args.lengths, args.reference_length, args.repeats = [256, 384], 128, 1
    dist.init_process_group("gloo" if args.tiny else "nccl")
    world = dist.get_world_size()
    device = torch.device("cpu") if args.tiny else torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = run(args, world, device, torch.float32 if args.tiny else torch.bfloat16)
    if dist.get_rank() == 0:
        print(f"{'part':<6} {'mode':<13} {'tokens':>8} {'step s':>9} {'tok/s/GPU':>11} {'GiB':>7} {'loss diff':>10}")
        for row in rows:
            print(f"{row['part']:<6} {row['mode']:<13} {row['tokens']:>8} {row['step_s']:>9.3f} "
                  f"{row['tokens_per_s_per_gpu']:>11.0f} {row['peak_gib']:>7.2f} "
                  f"{row.get('loss_diff_vs_one_gpu', float('nan')):>10.2e}")
        record = dict(bench="bench_linear_attention", family=args.family, layers=args.layers, world=world,
                      reference_length=args.reference_length, rows=rows, **machine())
        if args.tiny:
            print(json.dumps(record, sort_keys=True))
        else:
            write_record("bench_linear_attention", record)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
