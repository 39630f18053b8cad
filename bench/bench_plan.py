"""The plan's predicted GPU peak, host peak and step time against measured ones, configuration by configuration.

    python -m bench.bench_plan --layers 8 --gpu-mem-gib 79                        # one H200: every configuration
    python -m bench.bench_plan --layers 8 --gpu-mem-gib 40 --configs longest      # the longest length, and 1.15× it
    python -m bench.bench_plan --layers 8 --gpu-mem-gib 79 --configs longest --training lora   # frozen base weights
    python -m bench.bench_plan --layers 8 --gpu-mem-gib 79 --configs auto --lengths 131072 262144  # AutoMemory
    python -m bench.bench_plan --model path/to/config.json --layers 4 --gpu-mem-gib 79   # a MoE or hybrid family
    python -m bench.bench_plan --device cpu                                       # CPU smoke run (tiny model)

Each configuration runs in a fresh process (a clean allocator, host arena and peak RSS): the plan's own
choice at two lengths, longseq's defaults, the cache off, checkpoints kept on the GPU, untiled MLP and norms, a
length whose offloaded blocks are not powers of two (in the host arena's chunks), nothing checkpointed (tiled, and
untiled; Note [The loss in the plan]), and the plan's longest length
(which must run) and 1.15× it (which the plan must refuse, and which must run out of memory). GPU: the shape's
random-weight model, bf16 weights and gradients (training='forward-backward'), torch.cuda.max_memory_allocated and
the process's peak RSS (VmHWM) against the plan's GPU peak and host bytes per rank. CPU: a tiny Llama in fp32,
the live tensors' peak (plan/live_bytes.py) against the plan for the 'cpu' card. Prints a table and writes one
JSON record per configuration (bench/results/bench_plan.jsonl, and $OUT when set).

--training lora: every base weight frozen (requires_grad False) except the final norm's, and the embeddings' output
requires grad so that the backward runs through every layer (as adapters make it); no LoRA adapters are made. The
plan is asked with Workload(training='lora'), whose default rank-16 adapters with fp32 weights, gradients and AdamW
moments this run does not hold: each record states those bytes (predicted.adapters_gib); the measured peak lacks
them. --configs auto: the model is built with
longseq.apply(model, mesh, longseq.AutoMemory(machine=..., training=...)) at each of --lengths; the record holds the
MemoryConfig the model ran with (longseq.memory_config_in_use), the plan's for that shape and the plan's prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time

from longseq.plan.choice import Choice
from longseq.plan.planner import Plan, machine_for, plan, plan_longest
from longseq.plan.problem import Layout, Problem, Workload
from longseq.plan.search import evaluate
from longseq.plan.shapes import SHAPES, ModelShape, load_shape
from longseq.plan.state import FP32_STATE, lora_params

TINY = ModelShape(name="tiny", hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256)
_GIB = 2**30
_ALL_HOST = 1 << 10  # attention_host_layers "as many as there are layers"

# name -> (length on the GPU, length on the CPU, the choice: "plan" or Choice overrides)
CONFIGS = {
    "plan-32k": (32768, 2048, "plan"),
    "plan-128k": (131072, 4096, "plan"),
    "default-128k": (131072, 4096, {"attention_host_layers": _ALL_HOST}),
    "nocache-128k": (131072, 4096, {"cache_attention": False}),
    "gpu-checkpoints-64k": (65536, 2048, {"checkpoint_gpu_layers": 2, "attention_host_layers": _ALL_HOST}),
    "untiled-64k": (65536, 2048, {"tiled_mlp": False, "tiled_norms": False, "attention_host_layers": _ALL_HOST}),
    "arena-192k": (196608, 3072, {"attention_host_layers": _ALL_HOST}),
    "nockpt-32k": (32768, 2048, {"checkpointing": False}),  # tiled MLP, norms and loss; every activation kept
    "nockpt-untiled-16k": (16384, 2048, {"checkpointing": False, "tiled_mlp": False, "tiled_norms": False,
                                         "tiled_loss": False}),
    "longest": (None, None, "longest"),
    "auto": (None, None, "auto"),  # AutoMemory at each of --lengths
}
DEFAULT_LENGTHS = {"cuda": [131072], "cpu": [2048]}


def problem_for(args, length: int) -> Problem:
    cpu = args.device == "cpu"
    shape = load_shape(args.model) if args.model else TINY if cpu else SHAPES[args.shape]
    if args.layers:
        shape = shape.with_layers(args.layers)
    machine = machine_for("cpu" if cpu else args.card, gpu_memory_gib=args.gpu_mem_gib,
                          host_memory_gib=args.host_mem_gib)
    return Problem(shape=shape, layout=Layout(), workload=Workload(length=length, training=args.training),
                   machine=machine, dtype_bytes=4 if cpu else 2, offload_min_bytes=0 if cpu else 1 << 20)


def choose(problem: Problem, how) -> Choice | None:
    """The configuration to run: the plan's, or Choice overrides (counts clamped to the layers)."""
    if how == "plan":
        result = plan(problem)
        return result.chosen.choice if result.fits else None
    choice = Choice(**how)
    return dataclasses.replace(choice, attention_host_layers=min(choice.attention_host_layers,
                                                                 problem.shape.layers - choice.checkpoint_gpu_layers))


def model_from_config(path: str, layers: int, dtype):
    """A random-weight model of the config at `path` with its first `layers` layers (their kinds kept), loaded as
    transformers allows (GPT-OSS: eager) and run with SDPA as longseq's attention."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", None) or config
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    load_as = "eager" if text.model_type == "gpt_oss" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=load_as)
    model.config._attn_implementation = "sdpa"
    return model.train()


def hf_config(shape: ModelShape):
    import transformers

    kind = transformers.Qwen3Config if shape.qk_norm else transformers.LlamaConfig
    return kind(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                vocab_size=shape.vocab, tie_word_embeddings=shape.tied_embeddings, rope_theta=500000.0,
                max_position_embeddings=1 << 23)


def measure(problem: Problem, choice: Choice, device: str, timed_steps: int = 1, mesh=None, auto=None,
            build=None) -> dict:
    """Build the model (the shape's Llama or Qwen3, or `build()`'s), apply the plan's MemoryConfig (or `auto`, a
    longseq.AutoMemory, when given), run a warm-up step and `timed_steps` more; peaks of the last (on CPU: live
    tensors, plan/live_bytes.py). The model computes in the problem's dtype (bf16 for dtype_bytes 2, else fp32).
    `mesh`: a longseq Mesh when run on several ranks. training='lora': base weights frozen (freeze_base)."""
    import torch
    import transformers

    import longseq
    from longseq.plan.live_bytes import LiveBytes
    from longseq.memory import offload_stats

    memory = auto or Plan(problem=problem, chosen=evaluate(problem, choice)).memory_config()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if problem.dtype_bytes == 2 else torch.float32
    with torch.device(device):
        model = build() if build is not None else transformers.AutoModelForCausalLM.from_config(
            hf_config(problem.shape), dtype=dtype, attn_implementation="sdpa").train()
    if problem.workload.training == "lora":
        freeze_base(model)
    mesh = mesh or longseq.Mesh()
    longseq.apply(model, mesh, memory)
    batch = longseq.shard_batch(_batch(problem, device), mesh)

    def step():
        longseq.causal_lm_loss(model, batch, mesh).backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: they are part of the fixed memory

    result = dict(oom=False)
    try:
        step()
        if device == "cpu":
            with LiveBytes() as live:
                step()
            resident = sum((1 + p.requires_grad) * p.numel() * p.element_size() for p in model.parameters())
            result.update(gpu_gib=(live.peak + resident) / _GIB, left_after_step_gib=live.alive() / _GIB)
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(timed_steps):
                step()
            torch.cuda.synchronize()
            result.update(step_s=(time.perf_counter() - start) / timed_steps,
                          gpu_gib=torch.cuda.max_memory_allocated() / _GIB, host_gib=_peak_rss() / _GIB)
    except torch.OutOfMemoryError:
        result["oom"] = True
    in_use = longseq.memory_config_in_use(model)  # under AutoMemory: None when the first forward ran out of memory
    if auto is not None:
        result["memory_in_use"] = None if in_use is None else dataclasses.asdict(in_use)
    stats = offload_stats(model) if in_use is not None and in_use.offload_checkpoints else None
    if stats is not None:
        result.update(offloaded_peak_gib=stats.peak_bytes / _GIB, arena_peak_gib=stats.arena_peak_bytes / _GIB,
                      attention_not_kept=stats.attention_not_kept, checkpoints_on_device=stats.checkpoints_on_device)
    if device == "cpu":  # the host: what the offloader's arena took (the process itself is not modelled there)
        result["host_gib"] = result.get("arena_peak_gib", 0.0)
    return result


def freeze_base(model) -> None:
    """training='lora' without adapters: every weight frozen but the final norm's; the embeddings' output requires
    grad (as with adapters on the first layer), so the backward runs through every decoder layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_decoder().norm.weight.requires_grad_(True)
    model.enable_input_require_grads()


def _batch(problem: Problem, device: str) -> dict:
    """Random tokens; with packed documents, position_ids restart every longest_document tokens."""
    import torch

    work = problem.workload
    ids = torch.randint(0, problem.shape.vocab, (work.batch, work.length), device=device)
    positions = torch.arange(work.length, device=device) % work.document
    return {"input_ids": ids, "labels": ids, "position_ids": positions.expand(work.batch, -1)}


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def run_one(args, name: str, length: int, how) -> dict:
    """Predict and measure one configuration; the record of it."""
    problem = problem_for(args, length)
    choice = choose(problem, "plan" if how == "auto" else how)  # AutoMemory should run the plan's choice
    record = dict(bench="bench_plan", config=name, length=length, device=args.device, shape=problem.shape.name,
                  layers=problem.shape.layers, gpu_mem_gib=problem.machine.gpu_memory_gib, training=args.training)
    planned = plan(problem)
    record["plan_fits"] = planned.fits  # whether any configuration fits this length
    if choice is None:
        return record
    predicted = evaluate(problem, choice)
    record.update(choice=predicted.choice.as_dict(), predicted=dict(
        gpu_gib=predicted.footprint.gpu.bytes / _GIB, moment=predicted.footprint.gpu.moment,
        host_gib=predicted.footprint.host.bytes / _GIB, step_s=predicted.time.seconds))
    if args.training == "lora":  # in the prediction, not in the run (the module docstring)
        record["predicted"]["adapters_gib"] = lora_params(problem) * FP32_STATE / _GIB
    auto = None
    if how == "auto":
        import longseq

        record["plan_memory"] = dataclasses.asdict(planned.memory_config())
        auto = longseq.AutoMemory(machine=problem.machine, training=args.training,
                                  offload_min_bytes=problem.offload_min_bytes)
    if args.device == "cuda":
        import torch

        cap = problem.machine.gpu_memory_gib * _GIB / torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap))
    build = None
    if args.model:
        import torch

        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        build = functools.partial(model_from_config, args.model, problem.shape.layers, dtype)
    record["measured"] = measure(problem, predicted.choice, args.device, args.timed_steps, auto=auto, build=build)
    return record


def configs_to_run(args) -> list[tuple[str, int, object]]:
    """(name, length, how) for each configuration; 'longest' becomes the plan's longest length and 1.15× it."""
    runs = []
    for name in args.configs:
        gpu_length, cpu_length, how = CONFIGS[name]
        if how == "auto":
            runs += [(name, length, how) for length in args.lengths or DEFAULT_LENGTHS[args.device]]
            continue
        if how != "longest":
            runs.append((name, cpu_length if args.device == "cpu" else gpu_length, how))
            continue
        result = plan_longest(problem_for(args, 1024))
        choice, longer = result.chosen.choice.as_dict(), -(-int(result.longest * 1.15) // 64) * 64
        runs += [("longest", result.longest, choice), ("longest-x1.15", longer, choice)]
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    parser.add_argument("--model", help="a config.json or model directory instead of --shape (random weights; "
                                        "mixture-of-experts and hybrid families too)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--card", default="h200")
    parser.add_argument("--gpu-mem-gib", type=float, default=None)
    parser.add_argument("--host-mem-gib", type=float, default=None)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--timed-steps", type=int, default=1)
    parser.add_argument("--training", choices=("forward-backward", "lora"), default="forward-backward",
                        help="lora: base weights frozen but the final norm (no adapters), planned as 'lora'")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="--configs auto: the lengths to run (default 131072 on cuda, 2048 on cpu)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a JSON [name, length, how]: run it here, print the record
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args, *json.loads(args.one))), flush=True)
        return
    rows = [_in_fresh_process(argv or sys.argv[1:], run) for run in configs_to_run(args)]
    print(_table(rows))
    _write(rows)


def _in_fresh_process(argv: list[str], run) -> dict:
    command = [sys.executable, "-m", "bench.bench_plan", *argv, "--one", json.dumps(run)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return dict(bench="bench_plan", config=run[0], length=run[1], error=done.stderr[-2000:])
    return json.loads(lines[-1])


def _table(rows: list[dict]) -> str:
    head = f"{'config':<20}{'length':>9}{'plan fits':>10}{'GPU GiB pred / meas':>22}{'host GiB pred / meas':>22}" \
           f"{'step s pred / meas':>20}  moment"
    lines = [head]
    for r in rows:
        p, m = r.get("predicted", {}), r.get("measured", {})
        pair = (lambda key: f"{p.get(key, float('nan')):.4g} / {m.get(key, float('nan')):.4g}")
        gpu = f"{p.get('gpu_gib', float('nan')):.4g} / OOM" if m.get("oom") else pair("gpu_gib")
        lines.append(f"{r['config']:<20}{r['length']:>9}{str(r.get('plan_fits')):>10}{gpu:>22}{pair('host_gib'):>22}"
                     f"{pair('step_s'):>20}  {p.get('moment', r.get('error', '')[-80:])}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """Largest relative errors of the predictions, and the longest-length check."""
    out = {}
    for key in ("gpu_gib", "host_gib", "step_s"):
        errors = [r["predicted"][key] / r["measured"][key] - 1 for r in rows
                  if r.get("measured", {}).get(key) and not r["measured"].get("oom")]
        if errors:
            out[f"{key}_worst_error"] = max(errors, key=abs)
    runs = {r["config"]: r for r in rows}
    if "longest" in runs and "longest-x1.15" in runs:
        out["longest_runs"] = not runs["longest"].get("measured", {}).get("oom", True)
        out["longer_refused_by_plan"] = not runs["longest-x1.15"]["plan_fits"]
    return out


def _write(rows: list[dict]) -> None:
    import bench.common as common

    common.write_record("bench_plan", {"rows": rows, "summary": summary(rows), **common.machine()})


if __name__ == "__main__":
    main()
