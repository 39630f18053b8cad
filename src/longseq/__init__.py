"""longseq: train Hugging Face causal LMs on very long sequences, exactly."""

from longseq.data.shard import gather_sequence, shard_batch, shard_loader
from longseq.loss import LossConfig, causal_lm_loss
from longseq.memory.config import MemoryConfig
from longseq.mesh import Mesh, init_mesh
from longseq.models.apply import apply
from longseq.parallel.gradients import sync_gradients

__all__ = [
    "LossConfig", "Mesh", "MemoryConfig", "apply", "causal_lm_loss", "gather_sequence", "init_mesh", "shard_batch",
    "shard_loader", "sync_gradients",
]
