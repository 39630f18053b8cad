"""Run a test body on N gloo ranks, each its own process (the way torchrun would), and re-raise a rank's failure."""

from __future__ import annotations

import os
import socket

import multiprocessing

import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from a server that has already imported torch and transformers (~8 s per process otherwise).
multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "transformers", "longseq", "tests.models"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Call fn(*args) on `world_size` gloo ranks; fn must be a module-level function (it is pickled by name)."""
    mp.start_processes(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="forkserver")
