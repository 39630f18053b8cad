"""`longseq plan`: the fastest configuration that fits, or the longest length that fits, without a GPU.

    longseq plan --shape llama-8b --gpus 1 --length 131072 --gpu-mem-gib 79
    longseq plan --model path/to/model --gpus 8 --length max --lora
    longseq plan --shape qwen3-4b --length 262144 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from longseq.plan.card import available_cards
from longseq.plan.errors import PlanError
from longseq.plan.planner import default_ring, machine_for, plan, plan_longest
from longseq.plan.problem import TRAINING, Layout, Problem, Workload
from longseq.plan.report import as_dict, table
from longseq.plan.shapes import SHAPES, load_shape


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longseq plan", description=__doc__.splitlines()[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="config.json, model directory or Hub id")
    model.add_argument("--shape", choices=sorted(SHAPES), help="a named shape")
    p.add_argument("--layers", type=int, help="override the number of layers (e.g. to plan a shallow test)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in all (sp × dp)")
    p.add_argument("--sp", type=int, help="sequence-parallel degree (default: all GPUs)")
    p.add_argument("--ring", type=int, help="ring degree inside sp (default: init_mesh's: Ulysses as wide as allowed)")
    p.add_argument("--length", required=True, help="tokens per sequence, or 'max' for the longest that fits")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-step per data-parallel group")
    p.add_argument("--longest-document", type=int, help="packed documents: the longest one's length in tokens")
    p.add_argument("--gpu-mem-gib", type=float, help="memory of one GPU (default: the card's)")
    p.add_argument("--host-mem-gib", type=float, help="memory of one host (default: the card's machines')")
    p.add_argument("--gpus-per-host", type=int, help="GPUs sharing one host (default: min(gpus, 8))")
    p.add_argument("--card", default="h200", help=f"calibration: {', '.join(available_cards())} or a JSON file")
    training = p.add_mutually_exclusive_group()
    training.add_argument("--lora", action="store_const", const="lora", dest="training",
                          help="frozen bf16 weights and LoRA adapters")
    training.add_argument("--training", choices=TRAINING, help="full (default), lora, forward-backward")
    p.add_argument("--max-step-s", type=float, help="a step-time budget in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def problem_from(args) -> Problem:
    shape = load_shape(args.model or args.shape)
    if args.layers:
        shape = shape.with_layers(args.layers)
    sp = args.sp or args.gpus
    if args.gpus % sp:
        raise PlanError(f"--sp {sp} must divide --gpus {args.gpus} (dp = gpus / sp).")
    per_host = args.gpus_per_host or min(args.gpus, 8)
    machine = machine_for(args.card, gpu_memory_gib=args.gpu_mem_gib, host_memory_gib=args.host_mem_gib,
                          gpus_per_host=per_host)
    ring = args.ring or default_ring(shape, sp, per_host)
    length = 1024 if args.length == "max" else _length(args.length)
    workload = Workload(length=length, batch=args.batch, longest_document=args.longest_document,
                        training=args.training or "full")
    return Problem(shape=shape, layout=Layout(sp=sp, ring=ring, dp=args.gpus // sp), workload=workload,
                   machine=machine)


_SUFFIXES = {"k": 1 << 10, "m": 1 << 20}


def _length(text: str) -> int:
    """'131072', '128k' or '1M' tokens."""
    scale = _SUFFIXES.get(text[-1:].lower(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise PlanError(f"--length {text!r}: give a number of tokens (131072, 128k, 1M) or 'max'.") from None
    if value < 1:
        raise PlanError(f"--length {text!r} must be a positive number of tokens.")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        problem = problem_from(args)
        if args.length == "max":
            result = plan_longest(problem, max_step_s=args.max_step_s)
        else:
            result = plan(problem, max_step_s=args.max_step_s)
    except PlanError as error:
        print(f"longseq plan: {error}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(as_dict(result), indent=1, sort_keys=True) if args.json else table(result), flush=True)
    except BrokenPipeError:  # e.g. `longseq plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if result.fits else 1
