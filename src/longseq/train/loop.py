"""The training loop behind `longseq train`.

    longseq train CONFIG.yaml                                   # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 -m longseq.cli train CONFIG.yaml --parallel.sp=8
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m longseq.cli train CONFIG.yaml

Each step: every data-parallel group takes its share of the global batch's packed rows (the same rows on every sp
rank of the group), the valid-token count of the whole accumulation window is all-reduced once, and each micro-step's
`causal_lm_loss(..., num_tokens=that count)` makes the accumulated gradient exactly the gradient of the window's
mean loss (Note [Exact global loss]).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

import longseq
from longseq.data.packing import PackedRows, build_dataset
from longseq.data.tokenizer import load_tokenizer
from longseq.loss import IGNORE_INDEX
from longseq.mesh import Mesh, init_distributed
from longseq.train import checkpoint
from longseq.train.config import ConfigError, TrainConfig
from longseq.train.config_loader import to_dict
from longseq.train.engine import build_engine, clip_gradients, model_config
from longseq.train.evaluate import Evaluation
from longseq.train.metrics import Reporter, plot_loss, read_metrics, summary_line
from longseq.train.preflight import check_enough_rows, check_shardable, preflight
from longseq.train.resume import choose_start, continue_run_dir, run_fingerprint
from longseq.train.signals import StopRequests, signal_name


class TrainingError(RuntimeError):
    """A failure during training that the message explains (e.g. out of memory)."""


class Interrupted(Exception):
    """A stop signal: the run saved a checkpoint (if it had trained a step) and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class Run:
    """What the loop works on, built once by _train."""

    config: TrainConfig
    mesh: Mesh
    model: torch.nn.Module
    dataset: PackedRows
    evaluation: Evaluation | None
    tokenizer: object
    state: checkpoint.TrainState
    run_dir: Path
    fingerprint: dict
    start: Path | None


def train(config: TrainConfig) -> list[dict] | None:
    """Train as configured; returns the logged metric rows on rank 0 (None elsewhere)."""
    created = init_distributed(one_process=True)
    try:
        return _train(config)
    finally:
        if created:
            dist.destroy_process_group()
            # Free the model (module hooks make reference cycles) and with it the last references to the process
            # groups now, not during interpreter exit, where gloo's teardown can abort the process.
            gc.collect()


def _train(config: TrainConfig) -> list[dict] | None:
    preflight(config, dist.get_world_size())
    hf_config = model_config(config.model)
    mesh = _mesh(config, hf_config)
    run_dir = Path(config.metrics.run_dir)
    with StopRequests(partial(_abort, run_dir=run_dir, mesh=mesh)) as stop:
        run = _prepare(config, mesh, hf_config, run_dir)
        rows = _loop(run, stop)
    if config.checkpoint.export_hf:
        checkpoint.export_hf(run.model, run_dir / "hf", config.model.attn_implementation,
                             getattr(run.tokenizer, "inner", None))
    return rows


def finish(run_dir: Path) -> str:
    """Write loss.png and return the run's summary line (rank 0, at the end)."""
    history = read_metrics(run_dir / "metrics.jsonl")
    return summary_line(history, run_dir, _plot(history, run_dir))


def _mesh(config: TrainConfig, hf_config) -> Mesh:
    parallel = config.parallel
    try:
        mesh = longseq.init_mesh(sp=parallel.sp, dp=parallel.dp, ring=parallel.ring, model=hf_config)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from e
    check_shardable(config.data.seq_len, mesh)
    return mesh


def _prepare(config: TrainConfig, mesh: Mesh, hf_config, run_dir: Path) -> Run:
    """Data, fingerprint, start checkpoint, engine, then (rank 0) the run directory: Note [Resuming]."""
    data = config.data
    try:
        tokenizer = load_tokenizer(data.tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    dataset = build_dataset(data.paths, format=data.format, text_field=data.text_field, split=data.split,
                            tokenizer=tokenizer, seq_len=data.seq_len, seed=config.training.seed,
                            shuffle=data.shuffle, max_documents=data.max_documents, cache_dir=data.cache_dir)
    check_enough_rows(len(dataset), config, mesh)
    evaluation = _evaluation(config, tokenizer)
    fingerprint = run_fingerprint(config, tokenizer, dataset, mesh.dp)
    say = partial(_say, mesh)
    start, earlier = choose_start(config, run_dir, fingerprint, say)
    model, optimizer, scheduler = build_engine(config, mesh, hf_config, tokenizer.vocab_size)
    state = checkpoint.TrainState(model, optimizer, scheduler)
    if start is not None:
        checkpoint.load(state, start, earlier)
        say(f"longseq: resumed from {start} at step {state.step}")
    if mesh.rank == 0:
        continue_run_dir(run_dir, state.step, say)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return Run(config, mesh, model, dataset, evaluation, tokenizer, state, run_dir, fingerprint, start)


def _evaluation(config: TrainConfig, tokenizer) -> Evaluation | None:
    section, data = config.eval, config.data
    if not section.paths:
        return None
    rows = build_dataset(section.paths, format=data.format, text_field=data.text_field, split=section.split,
                         tokenizer=tokenizer, seq_len=data.seq_len, seed=0, shuffle=False, max_documents=None,
                         cache_dir=data.cache_dir, field="eval.paths")
    count = min(len(rows), section.max_sequences or len(rows))
    return Evaluation(rows, count, config.training.batch_size)


def _loop(run: Run, stop: StopRequests) -> list[dict] | None:
    config, mesh, state, section = run.config, run.mesh, run.state, run.config.checkpoint
    report = Reporter(config, mesh, run.model, run.run_dir, state.step)
    saved = run.start
    try:
        while True:
            signum = stop.agreed(mesh)
            if signum:
                _stop(run, signum, saved)
            if state.step >= config.training.steps:
                break
            report.lap()
            try:
                loss, grad_norm, positions = train_step(config, mesh, run.model, run.dataset, state)
            except torch.OutOfMemoryError as e:
                raise TrainingError(explain_oom(config, mesh, state.step + 1)) from e
            seconds = report.lap()
            report.step(state, loss, grad_norm, positions, seconds, _evaluate_if_due(run))
            if section.every and state.step % section.every == 0:
                saved = checkpoint.save(state, run.run_dir, section.keep, run.fingerprint)
    finally:
        report.close()
    if not _same(saved, checkpoint.checkpoint_dir(run.run_dir, state.step)):
        checkpoint.save(state, run.run_dir, section.keep, run.fingerprint)
    return report.rows if mesh.rank == 0 else None


def _evaluate_if_due(run: Run) -> float | None:
    every, step = run.config.eval.every, run.state.step
    if run.evaluation is None or not (step == run.config.training.steps or (every and step % every == 0)):
        return None
    return run.evaluation(run.model, run.mesh)


def _stop(run: Run, signum: int, saved: Path | None) -> None:
    """Note [Stopping without losing work]: save (unless this step is saved already), then raise Interrupted."""
    path = checkpoint.checkpoint_dir(run.run_dir, run.state.step)
    if run.state.step == 0:
        raise Interrupted(f"stopped by {signal_name(signum)} before the first step; nothing to save.", signum)
    if not _same(saved, path):
        checkpoint.save(run.state, run.run_dir, run.config.checkpoint.keep, run.fingerprint)
    if run.mesh.rank == 0:
        _plot(read_metrics(run.run_dir / "metrics.jsonl"), run.run_dir)
    raise Interrupted(f"stopped at step {run.state.step} by {signal_name(signum)}; checkpoint saved in {path}. Run "
                      "the same command to resume.", signum)


def _same(a: Path | None, b: Path) -> bool:
    return a is not None and a.resolve() == b.resolve()


def _abort(signum: int, run_dir: Path, mesh: Mesh) -> None:
    """A repeated stop signal: exit at once, without saving (Note [Stopping without losing work])."""
    done = [p for p in checkpoint.step_dirs(run_dir) if checkpoint.is_complete(p)]
    last = f"the last checkpoint is {done[-1]}" if done else "there is no checkpoint yet"
    _say(mesh, f"longseq train: aborted by a second {signal_name(signum)} without saving; {last}.")
    os._exit(128 + signum)


def _say(mesh: Mesh, line: str) -> None:
    """Print one line on rank 0 (stderr)."""
    if mesh.rank == 0:
        print(line, file=sys.stderr, flush=True)


def _plot(rows: list[dict], run_dir: Path) -> bool:
    return bool(rows) and plot_loss(rows, run_dir / "loss.png", f"longseq train: {run_dir.name}")


def train_step(config: TrainConfig, mesh: Mesh, model, dataset: PackedRows, state):
    """One optimizer step over grad_accum micro-batches; returns (loss, gradient norm, this dp rank's position_ids)."""
    batch_size, accum = config.training.batch_size, config.training.grad_accum
    torch.manual_seed((config.training.seed * 1_000_003 + state.step) * 4099 + mesh.rank)  # e.g. dropout
    first = state.samples + mesh.dp_rank * batch_size * accum
    micro = [dataset.batch(first + m * batch_size, batch_size) for m in range(accum)]
    num_tokens = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)),
                              device=mesh.device)
    if mesh.dp > 1:  # one all-reduce per step: the exact denominator of the whole accumulation window
        dist.all_reduce(num_tokens, group=mesh.dp_group)
    total = torch.zeros((), device=mesh.device)
    for batch in micro:
        local = longseq.shard_batch({k: v.to(mesh.device) for k, v in batch.items()}, mesh)
        loss = longseq.causal_lm_loss(model, local, mesh, num_tokens=num_tokens)
        loss.backward()
        total += loss.detach()
    grad_norm = clip_gradients(model, config.optim.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.samples += batch_size * accum * mesh.dp
    return float(total), grad_norm, torch.cat([b["position_ids"] for b in micro])


def explain_oom(config: TrainConfig, mesh: Mesh, step: int) -> str:
    """What ran out of memory, and what to switch on, most effective first."""
    tips = []
    if config.memory is None:
        tips.append("switch the memory features on (tiled MLP, norms and loss, offloaded checkpoints): drop "
                    "`memory: false` or --memory=false")
    else:
        memory = config.memory
        forced = memory.overrides if isinstance(memory, longseq.AutoMemory) else dataclasses.asdict(memory)
        off = [k for k in ("tiled_loss", "tiled_mlp", "tiled_norms", "offload_checkpoints") if forced.get(k) is False]
        tips += [f"--memory.{k}=true" for k in off]
    tips.append(f"raise parallel.sp (now {mesh.sp}) with more GPUs: each rank holds seq_len / sp tokens")
    if not config.training.cpu_offload:
        tips.append("--training.cpu_offload=true keeps parameters and optimizer state in host memory")
    if config.training.batch_size > 1:
        tips.append(f"lower training.batch_size (now {config.training.batch_size}) and raise training.grad_accum")
    tips.append("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True if memory is fragmented")
    return (f"out of memory at step {step} with data.seq_len={config.data.seq_len} (sp={mesh.sp}, "
            f"{config.data.seq_len // mesh.sp} tokens per rank). Try, in order:\n  - " + "\n  - ".join(tips))
