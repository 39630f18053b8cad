"""Where a run starts: from scratch, or from a checkpoint that continues the same experiment.

Note [Resuming]
1. The candidate: checkpoint.resume_from, else (with checkpoint.resume) the newest complete checkpoint of the run
   directory. A newer step directory without .metadata (a save that was cut short) is named in a warning, with the
   checkpoint used instead.
2. Damage: the candidate's .metadata must load and list only files that are there in full (checkpoint.damage);
   otherwise the run stops, naming the newest earlier intact checkpoint to resume from.
3. The fingerprint, what must match for a resumed run to continue the same experiment:
       model      model.path, model.config, model.random_init
       tokenizer  its vocabulary
       data       data.paths, format, text_field, split, max_documents, shuffle, training.seed, and the number of
                  documents and tokens they hold
       seq_len    data.seq_len
       layout     sequences per optimizer step (training.batch_size × training.grad_accum × dp)
   sp, ring and the number of GPUs may change: the loss is exact under any of them and DCP reshards. A mismatch
   stops an automatic resume before anything is written, naming the keys and the ways out. An explicit
   checkpoint.resume_from is obeyed whatever differs, except the model (no other model can load its weights); the
   differences are reported in one line.
4. The run directory then continues from the start step: checkpoints newer than it are moved to
   <run_dir>/replaced-<time>/ with a copy of metrics.jsonl as it was, and metrics.jsonl keeps the rows up to the
   start step (a fresh start keeps none).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from longseq.train.checkpoint import (
    FINGERPRINT, CheckpointError, damage, is_complete, step_dirs, unreadable,
)
from longseq.train.config import TrainConfig
from longseq.train.metrics import truncate_metrics


def run_fingerprint(config: TrainConfig, tokenizer, dataset, dp: int) -> dict:
    """The fingerprint of Note [Resuming] for this run."""
    model, data, training = config.model, config.data, config.training
    fingerprint = {
        "model": {"path": model.path, "config": model.config, "random_init": model.random_init},
        "tokenizer": tokenizer.fingerprint(),
        "data": {"paths": data.paths, "format": data.format, "text_field": data.text_field, "split": data.split,
                 "max_documents": data.max_documents, "shuffle": data.shuffle, "seed": training.seed,
                 "documents": dataset.documents, "tokens": dataset.total_tokens},
        "seq_len": data.seq_len,
        "layout": {"sequences_per_step": training.batch_size * training.grad_accum * dp},
    }
    return json.loads(json.dumps(fingerprint))  # as stored: tuples become lists


def choose_start(config: TrainConfig, run_dir: Path, fingerprint: dict, say) -> tuple[Path | None, Path | None]:
    """(the checkpoint to start from or None, the intact one before it); `say` prints a line on rank 0."""
    section = config.checkpoint
    if section.resume_from:
        path = Path(section.resume_from)
        if not is_complete(path):
            raise CheckpointError(f"checkpoint.resume_from={path} is not a complete checkpoint (no .metadata): point "
                                  "it at a checkpoints/step_NNNNNN directory that has one.")
    elif section.resume:
        path = _newest_complete(run_dir, say)
    else:
        return None, None
    if path is None:
        return None, None
    earlier = intact_before(path)
    problem = damage(path)
    if problem:
        raise CheckpointError(unreadable(path, problem, earlier))
    _compare(path, fingerprint, explicit=bool(section.resume_from), run_dir=run_dir, say=say)
    return path, earlier


def _newest_complete(run_dir: Path, say) -> Path | None:
    steps = step_dirs(run_dir)
    complete = [p for p in steps if is_complete(p)]
    newest = complete[-1] if complete else None
    cut_short = [p.name for p in steps if not is_complete(p) and (newest is None or p.name > newest.name)]
    if cut_short:
        instead = f"resuming from {newest}" if newest else "no complete checkpoint: starting from scratch"
        say(f"longseq: warning: {', '.join(cut_short)} in {run_dir / 'checkpoints'} has no .metadata (its save was cut "
            f"short); {instead}.")
    return newest


def intact_before(path: Path) -> Path | None:
    """The newest complete, undamaged checkpoint older than `path` in the same directory."""
    older = [p for p in step_dirs(path.parent.parent) if is_complete(p) and p.name < path.name]
    return next((p for p in reversed(older) if damage(p) is None), None)


def _compare(path: Path, fingerprint: dict, *, explicit: bool, run_dir: Path, say) -> None:
    stored_file = path / FINGERPRINT
    if not stored_file.exists():  # written by an older longseq: nothing to compare
        return
    stored = json.loads(stored_file.read_text())
    keys = [k for k in fingerprint if stored.get(k) != fingerprint[k]]
    if not keys:
        return
    what = f"{', '.join(keys)} differ{'s' if len(keys) == 1 else ''} ({_differences(stored, fingerprint)})"
    if explicit and "model" not in keys:
        say(f"longseq: resuming from {path} as checkpoint.resume_from asks, although its {what}.")
    elif explicit:
        raise CheckpointError(f"checkpoint.resume_from={path} holds another model: its {what}, so its weights cannot "
                              "load into this one. Point checkpoint.resume_from at a checkpoint of this model.")
    else:
        raise CheckpointError(
            f"{path} belongs to another experiment: its {what}. Use a new --metrics.run_dir, start over in {run_dir} "
            f"with --checkpoint.resume=false (its checkpoints are set aside), or resume anyway with "
            f"--checkpoint.resume_from={path}.")


# Fingerprint entries under the name of the config field they come from, where it differs.
_FIELDS = {"seq_len": "data.seq_len", "data.seed": "training.seed",
           "layout.sequences_per_step": "sequences per step (batch_size × grad_accum × dp)"}


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    before, after = _leaves(old), _leaves(new)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    shown = [f"{_FIELDS.get(k, k)} {_short(before.get(k))} → {_short(after.get(k))}" for k in changed[:limit]]
    return "; ".join(shown) + (f"; and {len(changed) - limit} more" if len(changed) > limit else "")


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def continue_run_dir(run_dir: Path, step: int, say) -> None:
    """Step 4 of Note [Resuming] (rank 0)."""
    newer = [p for p in step_dirs(run_dir) if _step_of(p) > step]
    metrics = run_dir / "metrics.jsonl"
    if newer:
        target = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        (target / "checkpoints").mkdir(parents=True, exist_ok=True)
        for path in newer:
            path.rename(target / "checkpoints" / path.name)
        if metrics.exists():
            shutil.copy2(metrics, target / "metrics.jsonl")
        say(f"longseq: moved {len(newer)} checkpoint(s) after step {step} ({', '.join(p.name for p in newer)}) to "
            f"{target}.")
    truncate_metrics(metrics, step)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1
