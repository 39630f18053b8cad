"""Checks made before anything is built or written: those that need only the config and the number of processes run
before any process starts (`--nproc`) and again on every rank (torchrun); the length against the mesh and the data
against the batch follow as soon as those exist. Each failure is one error naming the field and the fix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from longseq.data.readers import DataError
from longseq.data.shard import slices_per_row
from longseq.mesh import Mesh
from longseq.train.config import ConfigError, ModelSection, ParallelSection, TrainConfig


def preflight(config: TrainConfig, world: int) -> None:
    """Every check below, for a run over `world` processes."""
    sp = check_layout(config.parallel, world)
    check_attention(config.model, sp)
    check_run_dir(Path(config.metrics.run_dir))


def check_layout(parallel: ParallelSection, world: int) -> int:
    """sp × dp must be the number of processes and ring must divide sp; returns sp."""
    sp = parallel.sp if parallel.sp is not None else world // (parallel.dp or 1)
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    if sp > world:
        raise ConfigError(f"parallel.sp={sp} needs {sp} processes, but the run has {world}: launch {sp} (--nproc "
                          f"{sp}, or torchrun --nproc-per-node {sp}) or lower parallel.sp.")
    if sp < 1 or world % sp:
        raise ConfigError(f"parallel.sp={sp} does not divide the {world} processes of the run: choose parallel.sp "
                          f"among {divisors}.")
    dp = parallel.dp if parallel.dp is not None else world // sp
    if dp * sp != world:
        raise ConfigError(f"parallel.dp={dp} × parallel.sp={sp} = {dp * sp}, but the run has {world} processes: "
                          f"leave parallel.dp unset or make dp × sp = {world}.")
    if parallel.ring is not None and sp % parallel.ring:
        raise ConfigError(f"parallel.ring={parallel.ring} must divide parallel.sp={sp} (Ulysses takes sp // ring): "
                          f"choose among {[d for d in range(1, sp + 1) if sp % d == 0]}.")
    return sp


def check_attention(model: ModelSection, sp: int) -> None:
    """eager attention builds the S × S score matrix and has no sequence-parallel form: sp = 1 only."""
    if model.attn_implementation == "eager" and sp > 1:
        raise ConfigError(f"model.attn_implementation=eager runs at parallel.sp=1 only (this run has sp={sp}): "
                          "use sdpa (the default), flex_attention or flash_attention_2.")
    if sp > 1:
        from longseq.parallel.attention import check_implementation

        try:
            check_implementation(model.attn_implementation, 1)
        except ValueError as e:
            raise ConfigError(f"model.attn_implementation={model.attn_implementation}: {e}") from e


def check_run_dir(run_dir: Path) -> None:
    """The run directory exists or can be made, and a file can be written in it."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"metrics.run_dir={run_dir} cannot be made: {existing} is a file. Choose another "
                          "metrics.run_dir.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"metrics.run_dir={run_dir} is not writable ({e.strerror or e}): choose a directory you "
                          "can write to, or fix its permissions.") from e


def world_size() -> int:
    """The number of processes of this run when launched by torchrun (or --nproc), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_shardable(seq_len: int, mesh: Mesh) -> None:
    """Refuse a length that does not split evenly over the sp ranks."""
    pieces = slices_per_row(mesh)
    if seq_len % pieces:
        lower, upper = seq_len // pieces * pieces, -(-seq_len // pieces) * pieces
        raise ConfigError(
            f"data.seq_len={seq_len} cannot be split evenly over sp={mesh.sp}"
            f"{f' with ring={mesh.ring} (2 chunks per ring rank)' if mesh.ring > 1 else ''}: it must be a multiple "
            f"of {pieces}. Use data.seq_len={upper}" + (f" or {lower}." if lower else ".")
        )


def check_enough_rows(rows: int, config: TrainConfig, mesh: Mesh) -> None:
    """One step must find its sequences in the packed data."""
    needed = config.training.batch_size * config.training.grad_accum * mesh.dp
    if rows < needed:
        raise DataError(
            f"the data packs into {rows} sequences of {config.data.seq_len} tokens, but one step needs "
            f"{needed} (training.batch_size × training.grad_accum × dp). Add data or lower data.seq_len."
        )
