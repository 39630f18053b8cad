"""Single-GPU memory features, each exact and composable.

    config.py              MemoryConfig: which features, tile sizes, host budget
    tiled.py               Note [Tiled compute]: the MLP and RMSNorms of each decoder layer over sequence tiles
    tiled_moe.py           Note [Tiled experts]: expert blocks over sequence tiles, with their router statistics
    tiled_loss.py          Note [Tiled loss]: lm_head + cross-entropy over token tiles
    checkpoint_offload.py  Note [Checkpoint offload]: every decoder layer checkpointed, its input in host memory
    checkpoint_segments.py Note [Checkpoint segments]: one offloaded input per k layers, the others rebuilt
    attention_cache.py     Note [Attention output cache]: attention outputs kept from forward for the recompute
    host_budget.py         Note [Host budget]: how much host memory the offloader may fill
    host_arena.py          Note [Host arena]: the pinned pages every host copy lives in, never past the budget
    host_copy.py           a tensor's host copy and its way back (used by the offload and the cache)
    allocator.py           Note [Expandable segments]

The attention kernels' head groups (Note [Attention head groups], parallel/head_groups.py) are a memory feature too;
they live beside the kernels they call.

Order: apply_memory wraps the `forward` of each decoder layer and MLP instance, whatever it is at that moment (the
class's, or one an earlier wrapper installed). Apply it after the attention is set up (sequence-parallel
attention registered through transformers' attention interface runs inside the layer's forward, so it is
checkpointed and recomputed with it) and before `fully_shard`, whose hooks live in `__call__`, outside the
checkpoint and the tiles.
"""

from __future__ import annotations

from torch import nn

from longseq.memory.allocator import configure_allocator
from longseq.memory.checkpoint_offload import apply_checkpoint_offload, offload_stats
from longseq.memory.config import MemoryConfig
from longseq.memory.host_budget import reserve_host_memory
from longseq.memory.host_copy import OffloadStats
from longseq.memory.tiled import apply_tiled_mlp, apply_tiled_norms, tiled
from longseq.memory.tiled_loss import lm_head_cross_entropy_sum, tiled_cross_entropy_sum


def apply_memory(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Apply the features `config` switches on. The tiled loss is not a wrapper: the loss takes `config` as an
    argument (lm_head_cross_entropy_sum; longseq.apply's loss passes it)."""
    if config.expandable_segments:
        configure_allocator()
    if config.tiled_mlp:
        apply_tiled_mlp(model, config)
    if config.tiled_norms:
        apply_tiled_norms(model, config)
    if config.offload_checkpoints:
        apply_checkpoint_offload(model, config)
    return model


__all__ = [
    "MemoryConfig",
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
