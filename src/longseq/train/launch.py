"""Process management: join torchrun's process group, or start one of our own (one process, or N local ones).

Failures: under torchrun a worker that exits non-zero makes the agent stop the others (no hang); `spawn_local` runs
torchrun itself, so the demo gets the same behaviour.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed() -> bool:
    """Initialise torch.distributed (torchrun's env, or a one-process group); True if this call created it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A hung collective (e.g. a peer stuck outside torchrun) fails after this instead of waiting forever.
    timeout = datetime.timedelta(minutes=int(os.environ.get("LONGSEQ_TIMEOUT_MIN", "30")))
    if under_torchrun():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        # One process: FSDP2 and DCP still want a process group; an in-memory store needs no port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return True


def spawn_local(nproc: int, argv: list[str]) -> int:
    """Run `longseq <argv>` as `torchrun --standalone --nproc-per-node nproc`; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "longseq.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    process = subprocess.Popen(command, env=env)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # the workers got the same Ctrl-C and are saving a checkpoint: wait for them
            continue
