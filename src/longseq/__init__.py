"""longseq: train Hugging Face causal LMs on very long sequences, exactly.

The public names below are imported on first use (PEP 562), so that `import longseq.plan` and the `longseq` command
line do not import torch and transformers before a command needs them: `longseq plan` runs without a GPU, and
without torch for a named shape.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_PUBLIC = {
    "AutoMemory": "longseq.models.auto_memory",
    "LossConfig": "longseq.loss",
    "Mesh": "longseq.mesh",
    "MemoryConfig": "longseq.memory.config",
    "apply": "longseq.models.apply",
    "causal_lm_loss": "longseq.loss",
    "gather_sequence": "longseq.data.shard",
    "init_mesh": "longseq.mesh",
    "memory_config_in_use": "longseq.models.auto_memory",
    "shard_batch": "longseq.data.shard",
    "shard_loader": "longseq.data.shard",
    "sync_gradients": "longseq.parallel.gradients",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'longseq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
