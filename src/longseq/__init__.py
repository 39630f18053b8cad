"""longseq: train Hugging Face causal LMs on very long sequences, exactly."""

from longseq.data.shard import gather_sequence, shard_batch, shard_loader
from longseq.loss import LossConfig, causal_lm_loss
from longseq.memory.config import MemoryConfig
from longseq.mesh import Mesh, init_mesh
from longseq.models.apply import apply
from longseq.models.auto_memory import AutoMemory, memory_config_in_use
from longseq.parallel.gradients import sync_gradients

__all__ = [
    "AutoMemory", "LossConfig", "Mesh", "MemoryConfig", "apply", "causal_lm_loss", "gather_sequence", "init_mesh",
    "memory_config_in_use", "shard_batch", "shard_loader", "sync_gradients",
]
