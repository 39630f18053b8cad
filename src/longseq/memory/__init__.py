"""Single-GPU memory features, each exact and composable: tiled MLP, tiled loss, checkpoint offload, allocator.

Order: apply_memory wraps the `forward` of each decoder layer and MLP instance, whatever it is at that moment (the
class's, or one an earlier wrapper installed). Apply it after the attention is set up (sequence-parallel
attention registered through transformers' attention interface runs inside the layer's forward, so it is
checkpointed and recomputed with it) and before `fully_shard`, whose hooks live in `__call__`, outside the
checkpoint and the tiles.
"""

from __future__ import annotations

from torch import nn

from longseq.config import MemoryConfig
from longseq.memory.allocator import configure_allocator
from longseq.memory.loss import lm_head_cross_entropy_sum, tiled_cross_entropy_sum
from longseq.memory.offload import OffloadStats, apply_checkpoint_offload, offload_stats, reserve_host_memory
from longseq.memory.tiled import apply_tiled_mlp, apply_tiled_norms, tiled


def apply_memory(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Apply the features `config` switches on; the tiled loss is read from `model._longseq_memory` by the loss."""
    if config.expandable_segments:
        configure_allocator()
    if config.tiled_mlp:
        apply_tiled_mlp(model, config)
    if config.tiled_norms:
        apply_tiled_norms(model, config)
    if config.offload_checkpoints:
        apply_checkpoint_offload(model, config)
    model._longseq_memory = config
    return model


__all__ = [
    "OffloadStats",
    "apply_checkpoint_offload",
    "apply_memory",
    "apply_tiled_mlp",
    "apply_tiled_norms",
    "configure_allocator",
    "lm_head_cross_entropy_sum",
    "offload_stats",
    "reserve_host_memory",
    "tiled",
    "tiled_cross_entropy_sum",
]
