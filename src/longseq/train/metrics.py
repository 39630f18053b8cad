"""What a run reports: throughput and FLOP estimates, metrics.jsonl, TensorBoard, progress on rank 0, and the
summary line and loss plot at the end."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from longseq.parallel.documents import document_boundaries

# Dense bf16 peak TFLOP/s per accelerator (datasheets, without sparsity), matched against the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0, "MI300X": 1307.0}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def matmul_params(model) -> int:
    """Parameters a token's matmuls go through: all but the input embedding (a lookup), counted once if tied, and of
    a mixture-of-experts block only the top_k experts a token is routed to (not the experts it skips)."""
    embedding = model.get_input_embeddings().weight
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p is not embedding:
            seen.add(id(p))
            total += p.numel()
    return total - _idle_expert_params(model.config)


def _idle_expert_params(config) -> int:
    """Parameters of the experts a token is not routed to, per the plan's reading of the family (0 when dense)."""
    from longseq.plan import PlanError
    from longseq.plan.shapes import shape_from_config

    try:
        shape = shape_from_config(config)
    except PlanError:  # a family the plan does not read: count every parameter, as for a dense model
        return 0
    return shape.params - shape.active_params


def train_flops(params: int, layers: int, hidden: int, position_ids: torch.Tensor) -> float:
    """Forward + backward FLOPs of a batch: 6·N per token, plus causal attention 6·L·d·Σ len² over documents.

    (Causal attention costs half of the 12·L·d·len² of full attention, per document since documents are masked.)
    """
    lengths = [end - start for row in document_boundaries(position_ids) for start, end in zip(row[:-1], row[1:])]
    return 6.0 * params * position_ids.numel() + 6.0 * layers * hidden * float(sum(n * n for n in lengths))


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated (GPU), or the process's peak resident host memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to `step` (a resumed run writes the later ones again)."""
    if path.exists():
        kept = [row for row in read_metrics(path) if row["step"] <= step]
        partial = path.with_suffix(".jsonl.tmp")
        partial.write_text("".join(json.dumps(row) + "\n" for row in kept))
        partial.replace(path)


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and, if available, TensorBoard events. Rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool, start: int):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: events of steps after `start` (from before a resume) are dropped, as in metrics.jsonl
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
            except ImportError:
                print("longseq: tensorboard is not installed (pip install tensorboard); writing metrics.jsonl only.",
                      file=sys.stderr)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Rank 0's view of the run: a tqdm bar on a terminal, else one line per logged step on stdout (logs, `| tee`)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.bar, self.lines = total, None, False
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        else:
            self.lines = enabled

    def update(self, row: dict) -> None:
        shown = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:.0f}",
                 "TFLOP/s": f"{row['tflops_per_device']:.2f}", "mem": f"{row['peak_mem_gib']:.1f}G"}
        if row.get("mfu") is not None:
            shown["MFU"] = f"{100 * row['mfu']:.1f}%"
        if row.get("eval_loss") is not None:
            shown["eval_loss"] = f"{row['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(row["step"] - self.bar.n)
        elif self.lines:
            print(f"step {row['step']}/{self.total} " + " ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_line(rows: list[dict], run_dir: Path, plotted: bool) -> str:
    """One line for the end of a run: first → last loss, steps, tokens/s, where everything is."""
    if not rows:
        return f"longseq train: no steps logged; run directory {run_dir}"
    seconds = sum(r["step_s"] for r in rows)
    speed = sum(r["tokens"] for r in rows) / seconds if seconds else float("nan")
    plot = "loss.png" if plotted else "no loss.png: pip install matplotlib"
    evaluated = [r for r in rows if "eval_loss" in r]
    eval_part = f", eval loss {evaluated[-1]['eval_loss']:.4f} at step {evaluated[-1]['step']}" if evaluated else ""
    return (f"longseq train: loss {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f} over steps {rows[0]['step']}–"
            f"{rows[-1]['step']}{eval_part}, {speed:,.0f} tokens/s; run directory {run_dir} ({plot})")


def plot_loss(rows: list[dict], path: Path, title: str) -> bool:
    """The loss and its moving average against the step, as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    smooth, average = [], losses[0] if losses else 0.0
    for loss in losses:  # one sequence per step is noisy; the moving average shows the trend
        average = 0.9 * average + 0.1 * loss
        smooth.append(average)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="moving average")
    ax.legend()
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class Timer:
    """Wall time between calls, synchronising the accelerator so that the time covers the work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class Reporter:
    """Times each step and, on rank 0, writes metrics.jsonl and drives the progress view."""

    def __init__(self, config, mesh, model, run_dir: Path, start: int):
        self.config, self.mesh = config, mesh
        self.params = matmul_params(model)
        self.layers, self.hidden = model.config.num_hidden_layers, model.config.hidden_size
        self.peak = peak_tflops(mesh.device, config.metrics.peak_tflops)
        self.rows: list[dict] = []
        self.writer = self.progress = None
        if mesh.rank == 0:
            self.writer = MetricsWriter(run_dir, config.metrics.tensorboard, start)
            self.progress = Progress(config.training.steps, start, config.metrics.progress)
        self.timer = Timer(mesh.device)

    def lap(self) -> float:
        """Seconds since the last call (call before and after the timed work)."""
        return self.timer.lap()

    def step(self, state, loss: float, grad_norm: float, positions: torch.Tensor, seconds: float,
             eval_loss: float | None = None) -> None:
        """Log a step every metrics.log_every steps, and every step that was evaluated."""
        if self.mesh.rank != 0 or (state.step % self.config.metrics.log_every and eval_loss is None):
            return
        # Rank 0's rows stand for every dp group's (same length; document mix may differ slightly).
        flops = train_flops(self.params, self.layers, self.hidden, positions) * self.mesh.dp
        tflops = flops / seconds / 1e12 / self.mesh.world_size
        tokens = positions.numel() * self.mesh.dp
        row = {"step": state.step, "loss": loss, "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens": tokens, "tokens_per_s": tokens / seconds,
               "tflops_per_device": tflops, "mfu": tflops / self.peak if self.peak else None,
               "peak_mem_gib": peak_memory_gib(self.mesh.device), "step_s": seconds}
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
        self.rows.append(row)
        self.writer.write(row)
        self.progress.update(row)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.progress.close()
            self.writer = None
