"""Checkpoints with torch.distributed.checkpoint (each rank writes its own shards) and the Hugging Face export.

A checkpoint holds the model and optimizer (sharded, via get_state_dict), the schedule, the step and the data
cursor (samples consumed). With the data order a function of (seed, sample index) and per-step seeding, that is all
a resumed run needs to reproduce the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from longseq.models.anatomy import find_causal_lm


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


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (DCP writes .metadata last) in run_dir/checkpoints."""
    done = [p.parent for p in (run_dir / "checkpoints").glob("step_*/.metadata")]
    return max(done, key=lambda p: p.name, default=None)


def save(state: TrainState, run_dir: Path, keep: int | None) -> Path:
    """Write a checkpoint of the current step (collective), then drop the oldest beyond `keep` (rank 0)."""
    path = checkpoint_dir(run_dir, state.step)
    dcp.save({"train": state}, checkpoint_id=str(path))
    dist.barrier()
    if dist.get_rank() == 0 and keep is not None:
        done = sorted(p.parent for p in (run_dir / "checkpoints").glob("step_*/.metadata"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load(state: TrainState, path: Path) -> None:
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"checkpoint.resume_from={path} is not a complete checkpoint (no .metadata); "
                                "point it at a checkpoints/step_NNNNNN directory.")
    dcp.load({"train": state}, checkpoint_id=str(path))


def export_hf(model, out_dir: Path, attn_implementation: str, tokenizer=None) -> None:
    """Gather the full weights (collective) and write safetensors + config.json that from_pretrained loads."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(find_causal_lm(model).config)
        config._attn_implementation = attn_implementation  # not longseq's sequence-parallel kernel name
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(full, assign=True)
        fresh.tie_weights()
        fresh.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    dist.barrier()
