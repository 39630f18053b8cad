"""What a run reports: throughput and FLOP estimates, metrics.jsonl, TensorBoard, and the rank-0 progress bar."""

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
    """Parameters that take part in matmuls: all but the input embedding (a lookup), counted once if tied."""
    embedding = model.get_input_embeddings().weight
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p is not embedding:
            seen.add(id(p))
            total += p.numel()
    return total


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


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and, if available, TensorBoard events. Rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
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
    """A tqdm bar on rank 0: step, loss, tokens/s, TFLOP/s per device, MFU, peak memory, ETA."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        shown = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:.0f}",
                 "TFLOP/s": f"{row['tflops_per_device']:.2f}", "mem": f"{row['peak_mem_gib']:.1f}G"}
        if row.get("mfu") is not None:
            shown["MFU"] = f"{100 * row['mfu']:.1f}%"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(row["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
