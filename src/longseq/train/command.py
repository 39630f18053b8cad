"""`longseq train`: parse the command line, launch processes if asked, train, and explain failures.

    longseq train CONFIG.yaml [--section.key=value ...]            # one process: CPU or one GPU
    longseq train CONFIG.yaml --nproc 2                            # N local processes (launch.py)
    torchrun --nproc-per-node 8 -m longseq.cli train CONFIG.yaml   # GPUs; add --nnodes/--rdzv-endpoint for nodes
    longseq train --demo                                           # the embedded demo (2 CPU processes, sp=2)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from longseq.train.config import ConfigError
from longseq.train.config_loader import help_text, load_config

SAID_WAIT_S = 30
"""Seconds the other ranks wait for rank 0's line under torchrun (Note [One line from rank 0 under torchrun])."""

USAGE = "longseq train [CONFIG.yaml] [--demo] [--nproc N] [--section.key=value ...]"


def main(argv: list[str]) -> int:
    from longseq.train.signals import survive_closed_output

    survive_closed_output()
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {USAGE}\n\n{__doc__}\nConfig fields (YAML sections, or --section.key=value; defaults shown):"
              f"{help_text()}")
        return 0
    from longseq.data.readers import DataError
    from longseq.mesh import under_torchrun
    from longseq.train import demo
    from longseq.train.checkpoint import CheckpointError
    from longseq.train.launch import spawn_local
    from longseq.train.preflight import preflight, world_size

    try:
        args, overrides = _parse(argv)
        if args.config is None and not args.demo:
            raise ConfigError(f"give a config file or --demo; usage: {USAGE}")
        config = load_config(args.config, overrides, base=demo.DEMO if args.demo else None)
        nproc = args.nproc or (2 if args.demo else 1)
        launching = nproc > 1 and not under_torchrun()
        preflight(config, nproc if launching else world_size())
        if args.demo:
            demo.prepare(config)
        if launching:
            return spawn_local(nproc, ["train", *_without_nproc(argv)])
        return _run(config, args.demo)
    except (ConfigError, DataError, CheckpointError) as e:
        _error(e)
        return 2


def _run(config, is_demo: bool) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: under torchrun, an unexpected exception's traceback is reported as the root cause; the expected
    # failures below are explained in one line instead.
    return record(_train_and_explain)(config, is_demo)


def _train_and_explain(config, is_demo: bool) -> int:
    from longseq.data.readers import DataError
    from longseq.train import demo
    from longseq.train.checkpoint import CheckpointError
    from longseq.plan import PlanError
    from longseq.train.loop import Interrupted, TrainingError, finish, train

    try:
        rows = train(config)
    except Interrupted as e:
        _error(e, prefix="longseq train")
        return e.exit_code
    except (ConfigError, DataError, CheckpointError, PlanError) as e:  # PlanError: `memory: auto`, nothing fits
        _error(e)
        return 2
    except TrainingError as e:
        _error(e, every_rank=True)
        return 1
    if rows is not None:  # rank 0
        if is_demo:
            demo.report(rows)
        print(finish(Path(config.metrics.run_dir)), flush=True)
    return 0


def _error(error: Exception, prefix: str = "longseq train: error", every_rank: bool = False) -> None:
    """One line on stderr: from rank 0 for what every rank hits alike, from each rank (named) otherwise."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or every_rank:
        where = f"[rank {rank}] " if rank != "0" else ""
        print(f"{where}{prefix}: {error}", file=sys.stderr, flush=True)
    if not every_rank:
        _exit_after_rank0(rank)


def _exit_after_rank0(rank: str) -> None:
    """Under torchrun, a rank that exits before rank 0 has printed can take rank 0's line with it.

    Note [One line from rank 0 under torchrun]: torchrun's agent stops every worker as soon as one fails, with no
    grace, so when rank 1 reaches the shared error first and exits, rank 0 may be stopped before its print (CI saw
    the message missing). Rank 0 marks its line as said in the agent's store (the TCPStore at MASTER_PORT that
    torchrun keeps for its workers, TORCHELASTIC_USE_AGENT_STORE); the other ranks wait for that mark, at most
    SAID_WAIT_S, before they exit. `--nproc` runs need none of this: their launcher gives a shared exit a grace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from datetime import timedelta

    import torch.distributed as dist

    key = f"longseq/said/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=SAID_WAIT_S))
        if rank == "0":
            store.set(key, "said")
        else:
            store.wait([key])
    except (RuntimeError, OSError, KeyError, ValueError):  # no store, or rank 0 died first: nothing left to wait for
        pass



def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="longseq train", add_help=False, allow_abbrev=False)
    parser.add_argument("config", nargs="?")
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--nproc", type=int, default=None)
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}; overrides look like --section.key=value.")
        if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args, overrides


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out
