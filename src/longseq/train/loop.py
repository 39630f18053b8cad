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

import gc
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

import longseq
from longseq.data.packing import PackedRows, build_dataset
from longseq.data.readers import DataError
from longseq.data.shard import slices_per_row
from longseq.data.tokenizer import load_tokenizer
from longseq.loss import IGNORE_INDEX
from longseq.mesh import Mesh
from longseq.models.anatomy import find_causal_lm
from longseq.train import checkpoint
from longseq.train.config import ConfigError, TrainConfig, to_dict
from longseq.train.engine import build_engine, clip_gradients, model_config
from longseq.train.launch import init_distributed
from longseq.train.metrics import (
    MetricsWriter, Progress, Timer, matmul_params, peak_memory_gib, peak_tflops, train_flops,
)


class TrainingError(RuntimeError):
    """A failure during training that the message explains (e.g. out of memory)."""


class Interrupted(Exception):
    """Ctrl-C: the run stopped after saving a checkpoint."""


def train(config: TrainConfig) -> list[dict] | None:
    """Train as configured; returns the logged metric rows on rank 0 (None elsewhere)."""
    created = init_distributed()
    try:
        return _train(config)
    finally:
        if created:
            dist.destroy_process_group()
            # Free the model (module hooks make reference cycles) and with it the last references to the process
            # groups now, not during interpreter exit, where gloo's teardown can abort the process.
            gc.collect()


def _train(config: TrainConfig) -> list[dict] | None:
    parallel = config.parallel
    mesh = longseq.init_mesh(sp=parallel.sp, dp=parallel.dp, ring=parallel.ring, model=model_config(config.model))
    check_shardable(config.data.seq_len, mesh)
    run_dir = Path(config.metrics.run_dir)
    if mesh.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    data = config.data
    dataset = build_dataset(data.paths, format=data.format, text_field=data.text_field, split=data.split,
                            tokenizer=data.tokenizer, seq_len=data.seq_len, seed=config.training.seed,
                            shuffle=data.shuffle, max_documents=data.max_documents)
    check_enough_rows(dataset, config, mesh)
    vocab_size = load_tokenizer(data.tokenizer).vocab_size
    model, optimizer, scheduler = build_engine(config, mesh, vocab_size)
    state = checkpoint.TrainState(model, optimizer, scheduler)
    _resume(state, config, run_dir, mesh)
    rows = _loop(config, mesh, model, dataset, state, run_dir)
    if config.checkpoint.export_hf:
        tokenizer = load_tokenizer(data.tokenizer)
        checkpoint.export_hf(model, run_dir / "hf", config.model.attn_implementation,
                             getattr(tokenizer, "inner", None))
    return rows


def check_shardable(seq_len: int, mesh: Mesh) -> None:
    """Refuse a length that does not split evenly over the sp ranks, before any work is done."""
    pieces = slices_per_row(mesh)
    if seq_len % pieces:
        lower, upper = seq_len // pieces * pieces, -(-seq_len // pieces) * pieces
        raise ConfigError(
            f"data.seq_len={seq_len} cannot be split evenly over sp={mesh.sp}"
            f"{f' with ring={mesh.ring} (2 chunks per ring rank)' if mesh.ring > 1 else ''}: it must be a multiple "
            f"of {pieces}. Use data.seq_len={upper}" + (f" or {lower}." if lower else ".")
        )


def check_enough_rows(dataset: PackedRows, config: TrainConfig, mesh: Mesh) -> None:
    needed = config.training.batch_size * config.training.grad_accum * mesh.dp
    if len(dataset) < needed:
        raise DataError(
            f"the data packs into {len(dataset)} sequences of {config.data.seq_len} tokens, but one step needs "
            f"{needed} (training.batch_size × training.grad_accum × dp). Add data or lower data.seq_len."
        )


def _resume(state: checkpoint.TrainState, config: TrainConfig, run_dir: Path, mesh: Mesh) -> None:
    section = config.checkpoint
    path = Path(section.resume_from) if section.resume_from else None
    if path is None and section.resume:
        path = checkpoint.latest_checkpoint(run_dir)
    if path is not None:
        checkpoint.load(state, path)
        if mesh.rank == 0:
            print(f"longseq: resumed from {path} at step {state.step}", flush=True)


def _loop(config: TrainConfig, mesh: Mesh, model, dataset: PackedRows, state, run_dir: Path) -> list[dict] | None:
    steps, section = config.training.steps, config.checkpoint
    report = _Reporter(config, mesh, model, run_dir, state.step)
    saved = None
    with _CtrlC() as ctrl_c:
        while state.step < steps:
            report.start()
            try:
                loss, grad_norm, positions = train_step(config, mesh, model, dataset, state)
            except torch.OutOfMemoryError as e:
                raise TrainingError(explain_oom(config, mesh, state.step + 1)) from e
            report.step(state, loss, grad_norm, positions)
            if ctrl_c.agreed(mesh):
                checkpoint.save(state, run_dir, section.keep)
                report.close()
                raise Interrupted(f"stopped at step {state.step} after Ctrl-C; checkpoint saved in "
                                  f"{checkpoint.checkpoint_dir(run_dir, state.step)}. Run the same command to resume.")
            if section.every and state.step % section.every == 0:
                saved = checkpoint.save(state, run_dir, section.keep)
    if saved is None or saved != checkpoint.checkpoint_dir(run_dir, state.step):
        checkpoint.save(state, run_dir, section.keep)
    report.close()
    return report.rows if mesh.rank == 0 else None


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
        tips.append("switch on the memory features: --memory.tiled_loss=true (tiled MLP, tiled loss and "
                    "offloaded checkpoints all come on with any memory.* key)")
    else:
        off = [k for k in ("tiled_loss", "tiled_mlp", "tiled_norms", "offload_checkpoints")
               if not getattr(config.memory, k)]
        tips += [f"--memory.{k}=true" for k in off]
    tips.append(f"raise parallel.sp (now {mesh.sp}) with more GPUs: each rank holds seq_len / sp tokens")
    if not config.training.cpu_offload:
        tips.append("--training.cpu_offload=true keeps parameters and optimizer state in host memory")
    if config.training.batch_size > 1:
        tips.append(f"lower training.batch_size (now {config.training.batch_size}) and raise training.grad_accum")
    tips.append("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True if memory is fragmented")
    return (f"out of memory at step {step} with data.seq_len={config.data.seq_len} (sp={mesh.sp}, "
            f"{config.data.seq_len // mesh.sp} tokens per rank). Try, in order:\n  - " + "\n  - ".join(tips))


class _CtrlC:
    """The first Ctrl-C asks for a checkpoint at the end of the step; a second one aborts at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def agreed(self, mesh: Mesh) -> bool:
        """True on every rank if any rank was interrupted (they must save together)."""
        if mesh.world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=mesh.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


class _Reporter:
    """Times each step and, on rank 0, writes metrics and drives the progress bar."""

    def __init__(self, config: TrainConfig, mesh: Mesh, model, run_dir: Path, start: int):
        causal = find_causal_lm(model)
        self.config, self.mesh = config, mesh
        self.params = matmul_params(causal)
        self.layers, self.hidden = causal.config.num_hidden_layers, causal.config.hidden_size
        self.peak = peak_tflops(mesh.device, config.metrics.peak_tflops)
        self.rows: list[dict] = []
        self.writer = self.progress = None
        if mesh.rank == 0:
            self.writer = MetricsWriter(run_dir, config.metrics.tensorboard)
            self.progress = Progress(config.training.steps, start, config.metrics.progress)
        self.timer = Timer(mesh.device)

    def start(self) -> None:
        self.timer.lap()

    def step(self, state, loss: float, grad_norm: float, positions: torch.Tensor) -> None:
        seconds = self.timer.lap()
        if self.mesh.rank != 0 or state.step % self.config.metrics.log_every:
            return
        # Rank 0's rows stand for every dp group's (same length; document mix may differ slightly).
        flops = train_flops(self.params, self.layers, self.hidden, positions) * self.mesh.dp
        tflops = flops / seconds / 1e12 / self.mesh.world_size
        tokens = positions.numel() * self.mesh.dp
        row = {"step": state.step, "loss": loss, "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens": tokens, "tokens_per_s": tokens / seconds,
               "tflops_per_device": tflops, "mfu": tflops / self.peak if self.peak else None,
               "peak_mem_gib": peak_memory_gib(self.mesh.device), "step_s": seconds}
        self.rows.append(row)
        self.writer.write(row)
        self.progress.update(row)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.progress.close()
