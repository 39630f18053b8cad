"""Side by side on the same GPUs: plain HF, HF with host offload + Liger, accelerate's context parallel, DeepSpeed
ALST and longseq, one training step each on identical tokens, each beside the ideal step of this card.

    python -m bench.run_peers drive --gpus 1 --sp 1 --layers 8 --lengths 16384 32768 \
        --contenders hf hf-offload alst longseq --code abc1234 --call 19                        # one GPU
    python -m bench.run_peers drive --gpus 2 --sp 2 --lengths 131072 --contenders longseq alst accelerate-cp
    python -m bench.run_peers drive --gpus 4 --sp 4 --layers 4 --search --lengths 262144 --contenders longseq alst
    torchrun --nproc-per-node 2 -m bench.run_peers --sp 2 --contender alst --placement optimizer --lengths 65536
    python -m bench.run_peers drive --device cpu --sp 1 --shape tiny --lengths 256 \
        --contenders hf hf-offload longseq --results /tmp/peers.jsonl                              # CPU smoke run
    python -m bench.run_peers check-alst                                        # CPU: ALST code path (needs DeepSpeed)

The driver (bench/peers_driver.py) first times this card's attention and GEMMs at the run's shapes (Note [Ideal step]
in bench/peers_ideal.py), then starts one fresh torchrun per contender, length and placement (an OOM or a crash
cannot poison the next run, and host memory is measured per run), each with a time limit, under a total --budget.
Contenders (bench/peers_contenders.py, peers_alst.py, peers_accelerate.py), each at its best: its training state
(parameters, gradients, optimizer) is placed on the GPU where it fits and offloaded only after the run on the GPU is
out of memory (--placement auto; the record states the placement and what was tried). hf: transformers with
activation checkpointing. hf-offload: transformers' checkpointing with offload=True plus Liger's kernels (what TRL's
activation offloading and use_liger_kernel give). accelerate-cp (sp > 1): accelerate's ParallelismConfig(cp_size=sp),
FSDP2 and torch's ring attention, with hf-offload's model. alst, alst-arctic-offload: DeepSpeed ZeRO-3, Ulysses,
TiledMLP, TiledFusedLogitsLoss, Liger RoPE/RMSNorm, checkpoint offload by DeepSpeed's context manager or
ArcticTraining's patch. longseq: longseq.apply (--memory, --memory-field) + the trainer's FSDP2 and AdamW;
longseq-nocache: attention recomputed in backward. Every model is the random-weight shape from the same seed and
every run sees the same token ids, so first-step losses must agree. A contender that cannot run here (Liger,
DeepSpeed or CUDA missing) records status "unavailable" and its one-line reason. --search finds the longest length
that fits (doubling, then bisecting, one step each). Records go to bench/results/peers.jsonl (or --results; and
$OUT/peers.jsonl); the driver prints a table and ends with one JSON line. bench/report_peers.py writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import model_flops, synchronize, timed
from bench.peers_records import (
    PLACEMENTS, ContenderUnavailable, add_run_options, base_record, emit, versions,
)


def make_tokens(length: int, vocab: int, seed: int) -> torch.Tensor:
    """The same (1, length) token ids for every contender: a seeded CPU generator."""
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def host_peak_gib() -> float:
    """This process's peak resident host memory (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(contender, length: int, args, device: torch.device) -> dict:
    """First step (its loss; the warm-up), then --timed steps; peaks are the max over ranks of the whole run."""
    tokens = make_tokens(length, contender.config.vocab_size, args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loss = contender.step(tokens)
    timing = dict(step_s=float("nan"))
    if args.timed:
        timing = timed(lambda: contender.step(tokens), args.timed).fields("step")
    seconds = timing["step_s"]
    synchronize()
    cuda = device.type == "cuda"
    peaks = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                          torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0, host_peak_gib()],
                         device=device, dtype=torch.float64)
    world = dist.get_world_size()
    if world > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    extra = dict(profile_top=profile_step(lambda: contender.step(tokens), cuda)) if args.profile else {}
    return dict(status="ok", first_step_loss=loss, peak_gib=peaks[0].item(), reserved_gib=peaks[1].item(),
                host_peak_gib=peaks[2].item(), **timing, tokens_per_s_per_gpu=length / seconds / world,
                tflops_per_gpu=model_flops(length, contender.config) / seconds / world / 1e12, **extra)


def profile_step(step, cuda: bool, top: int = 25) -> list[dict]:
    """One more step (after the timed ones, so their figures are untouched) under torch.profiler: the kernels with the
    most device time (on CPU: the ops with the most self CPU time), with their share of the step's total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        synchronize()
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, field) > 0]
    total = sum(getattr(e, field) for e in events) or 1
    events.sort(key=lambda e: getattr(e, field), reverse=True)
    return [dict(name=e.key[:160], calls=e.count, ms=round(getattr(e, field) / 1e3, 2),
                 share=round(getattr(e, field) / total, 4)) for e in events[:top]]






def classify(exc: BaseException) -> str:
    if isinstance(exc, ContenderUnavailable):
        return "unavailable"
    oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    return "oom" if oom else "error"


def worker(args) -> None:
    """One torchrun: one contender, its lengths in order (stops at the first failure)."""
    from bench.peers_registry import prepare

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    length = args.lengths[0]
    try:
        contender = prepare(args.contender, args)
        for length in args.lengths:
            result = measure(contender, length, args, device)
            if rank == 0:
                emit({**base_record(args, length, world), **result, "settings": contender.settings,
                      "layers_built": contender.config.num_hidden_layers, **contender.observed(), **versions()},
                     args.records)
    except BaseException as exc:  # noqa: BLE001 - one failing rank must still leave a record behind
        status = classify(exc)
        record = {**base_record(args, length, world), "status": status, "rank": rank,
                  "error": str(exc) if status == "unavailable" else f"{type(exc).__name__}: {str(exc)[:600]}",
                  **versions()}
        if status == "unavailable":
            print(f"{args.contender}: unavailable: {exc}", file=sys.stderr)
        else:
            traceback.print_exc()
        if args.records:
            Path(f"{args.records}.rank{rank}.err").write_text(json.dumps(record, default=str))
        else:
            print(json.dumps(record, default=str), flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # peers may sit in a collective: no destroy_process_group
    dist.destroy_process_group()


def worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", default="longseq")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536])
    parser.add_argument("--placement", default="gpu", choices=PLACEMENTS,
                        help="where the training state lives (the driver picks it per contender)")
    parser.add_argument("--records", default=None, help="append rank 0's records here (the driver sets it)")
    add_run_options(parser)
    return parser


def main() -> None:
    if sys.argv[1:2] == ["drive"]:
        from bench.peers_driver import drive

        drive(sys.argv[2:])
    elif sys.argv[1:2] == ["check-alst"]:
        from bench.peers_alst import self_check

        try:
            print(json.dumps(self_check()))
        except ContenderUnavailable as skipped:
            print(f"skipped: {skipped}")
    else:
        worker(worker_parser().parse_args())


if __name__ == "__main__":
    main()
