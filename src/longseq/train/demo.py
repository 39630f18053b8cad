"""`longseq train --demo`: a tiny Llama learns Python from the standard library's own source, on CPU, sp=2.

    longseq train --demo                                  # 2 local processes (CPU, gloo), a few minutes
    longseq train --demo --training.steps=20              # shorter
    torchrun --nproc-per-node 2 -m longseq.cli train --demo   # the same, launched by hand

Each document is one standard-library package, its .py files concatenated (no download); the byte tokenizer turns
them into 4096-token sequences, each split over 2 sequence-parallel ranks. At the end the run directory holds the
checkpoint, metrics.jsonl, the HF export and loss.png.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

DEFAULT_RUN_DIR = "runs/demo"
# Tables and generated data rather than code, or tests (large, repetitive).
SKIPPED = {"test", "tests", "site-packages", "pydoc_data", "encodings", "idlelib", "turtledemo"}

DEMO = {
    "model": {"config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                         "vocab_size": 259, "max_position_embeddings": 8192, "tie_word_embeddings": True}},
    "data": {"paths": [f"{DEFAULT_RUN_DIR}/data/stdlib.jsonl"], "tokenizer": "byte", "seq_len": 4096},
    "parallel": {"sp": 2},
    "memory": False,  # 2048 tokens per rank need none of the memory features (they trade time for memory)
    "optim": {"lr": 0.002, "warmup_steps": 10, "weight_decay": 0.0, "min_lr_ratio": 0.1},
    "training": {"steps": 150, "batch_size": 1, "seed": 0},
    "checkpoint": {"every": 50, "resume": False},
    "metrics": {"run_dir": DEFAULT_RUN_DIR, "log_every": 1},
}


def prepare(config) -> None:
    """Point data.paths at <run_dir>/data/stdlib.jsonl and write it once (atomically: ranks may race)."""
    path = Path(config.metrics.run_dir) / "data" / "stdlib.jsonl"
    config.data.paths = [str(path)]
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    with open(partial, "w") as f:
        for name, text in stdlib_packages():
            f.write(json.dumps({"package": name, "text": text}) + "\n")
    os.replace(partial, path)


def stdlib_packages():
    """(package, concatenated source) for every package of this Python's standard library, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for package in sorted(p for p in root.iterdir() if (p / "__init__.py").exists() and p.name not in SKIPPED):
        files = sorted(f for f in package.rglob("*.py") if not SKIPPED & set(f.relative_to(root).parts))
        text = "".join(f"# file: {f.relative_to(root)}\n{f.read_text(encoding='utf-8', errors='replace')}\n"
                       for f in files)
        if text:
            yield package.name, text


def report(rows: list[dict]) -> None:
    """Print the loss table (the summary line and loss.png come with every run)."""
    if not rows:
        return
    every = max(1, len(rows) // 15)
    shown = rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])
    print(f"\n{'step':>6} {'loss':>8} {'tokens/s':>10}")
    for row in shown:
        print(f"{row['step']:>6} {row['loss']:>8.4f} {row['tokens_per_s']:>10.0f}")
