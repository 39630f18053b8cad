"""Checkpoints with torch.distributed.checkpoint (each rank writes its own shards) and the Hugging Face export.

A checkpoint holds the model and optimizer (sharded, via get_state_dict), the schedule, the step and the data
cursor (samples consumed). With the data order a function of (seed, sample index) and per-step seeding, that is all
a resumed run needs to reproduce the uninterrupted run's losses exactly. Beside them, fingerprint.json records what
must match for a resume to continue the same experiment (Note [Resuming] in resume.py); it is written before the
shards, and DCP writes .metadata last, so a checkpoint with .metadata is complete.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class TrainState(Stateful):
    """Everything a resumed run needs, in the shape dcp.save/dcp.load expect."""

    def __init__(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step = 0
        self.samples = 0

    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict(),
                "step": self.step, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.samples = int(state["step"]), int(state["samples"])


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and the way out."""


FINGERPRINT = "fingerprint.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def step_dirs(run_dir: Path) -> list[Path]:
    """Every run_dir/checkpoints/step_NNNNNN directory, complete or not, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())


def is_complete(path: Path) -> bool:
    return (path / ".metadata").exists()


def save(state: TrainState, run_dir: Path, keep: int | None, fingerprint: dict) -> Path:
    """Write a checkpoint of the current step (collective), then drop the oldest beyond `keep` (rank 0)."""
    path = checkpoint_dir(run_dir, state.step)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1))
    dcp.save({"train": state}, checkpoint_id=str(path))
    dist.barrier()
    if dist.get_rank() == 0 and keep is not None:
        for old in [p for p in step_dirs(run_dir) if is_complete(p)][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load(state: TrainState, path: Path, earlier: Path | None) -> None:
    """Load `path` into `state` (collective); a failure names the checkpoint and `earlier`, an intact one."""
    try:
        dcp.load({"train": state}, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises many kinds (pickle, zip, assertion)
        cause = _root_cause(e)
        raise CheckpointError(unreadable(path, f"{type(cause).__name__}: {_first_line(cause)}", earlier)) from e


def _root_cause(error: BaseException) -> BaseException:
    """The first rank's exception inside a CheckpointException (which is a BaseException), else `error`."""
    failures = getattr(error, "failures", None) or {}
    first = next(iter(failures.values()), None)
    first = first[0] if isinstance(first, tuple) else first
    return first if isinstance(first, BaseException) else error


def unreadable(path: Path, reason: str, earlier: Path | None) -> str:
    """One line: which checkpoint is damaged, why, and where to resume from instead."""
    way_out = (f"resume from the intact {earlier.name} with --checkpoint.resume_from={earlier}" if earlier else
               "no intact earlier checkpoint remains: start over with --checkpoint.resume=false")
    return f"checkpoint {path} is truncated or corrupt ({reason}): {way_out} (newer checkpoints are set aside)."


def _first_line(error: BaseException) -> str:
    """The first sentence of the error's message."""
    text = str(error).strip().splitlines()
    return text[0].split(". ")[0][:200] if text else "no message"


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be whole (unreadable .metadata, missing or short files), or None."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything
        return f".metadata cannot be read: {type(e).__name__}: {_first_line(e)}"
    needed = {}
    for item in getattr(metadata, "storage_data", {}).values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} has {file.stat().st_size} bytes of the {size} that .metadata lists"
    return None


def export_hf(model, out_dir: Path, attn_implementation: str, tokenizer=None) -> None:
    """Gather the full weights of the trained CausalLM `model` (collective) and write safetensors + config.json that
    from_pretrained loads, and the tokenizer's files if it is a Hugging Face one."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(model.config)
        config._attn_implementation = attn_implementation  # not longseq's sequence-parallel kernel name
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(full, assign=True)
        fresh.tie_weights()
        fresh.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    dist.barrier()
