"""A plan's choices, and the one function that turns them into longseq's MemoryConfig.

The canonical placement of checkpoints and kept attention outputs (what the offloader does):

    layer:        0 … n_host_pairs−1 │ … │ L−n_gpu_attention … L−1
    checkpoint:   host (one per layers_per_checkpoint) … │ the last keep_last_layers_on_gpu layers: GPU
    attention:    kept on the host     │ recomputed │ kept on the GPU (keep_last_attention_on_gpu)

The offloader keeps pairs for the earliest offloaded layers while its host budget has room (Note [Host budget]),
so giving it exactly the planned host bytes as `host_memory_gib` reproduces the planned split.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

_GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One configuration of longseq's memory features, placements and FSDP2 offload."""

    tiled_mlp: bool = True
    """MemoryConfig.tiled_mlp."""
    tiled_norms: bool = True
    """MemoryConfig.tiled_norms."""
    fuse_norms: bool = True
    """MemoryConfig.fuse_norms: the norms' readers recompute them, no normed output is kept (with tiled_norms)."""
    tiled_loss: bool = True
    """MemoryConfig.tiled_loss."""
    tile_memory_mib: int = 256
    """MemoryConfig.tile_memory_mib: one tile's largest intermediate."""
    attention_memory_mib: int = 1024
    """MemoryConfig.attention_memory_mib: one attention kernel call's backward buffers (sets the heads per call)."""
    checkpointing: bool = True
    """Checkpoint every decoder layer (MemoryConfig.offload_checkpoints); False keeps every layer's activations."""
    checkpoint_gpu_layers: int = 0
    """The last n layers keep their checkpoints on the GPU (MemoryConfig.keep_last_layers_on_gpu); the rest go to
    the host."""
    layers_per_checkpoint: int = 1
    """MemoryConfig.layers_per_checkpoint: one offloaded checkpoint per k layers, the others rebuilt in backward."""
    cache_attention: bool = True
    """Keep attention outputs and log-sum-exps for backward instead of recomputing attention."""
    attention_host_layers: int = 0
    """Of the layers not keeping their attention output on the GPU, the first n keep it on the host."""
    attention_gpu_layers: int | None = None
    """The last n layers keep their attention output on the GPU (MemoryConfig.keep_last_attention_on_gpu); None: as
    many as keep their checkpoint there."""
    prefetch_after_attention: bool = True
    """MemoryConfig.prefetch_after_attention: the previous checkpoint comes back after a layer's attention backward."""
    fsdp_cpu_offload: bool = False
    """FSDP2 keeps parameters, gradients and AdamW state on the host (`longseq train`'s training.cpu_offload)."""

    @property
    def gpu_attention_layers(self) -> int:
        return self.checkpoint_gpu_layers if self.attention_gpu_layers is None else self.attention_gpu_layers

    def placement(self, layers: int) -> list[tuple[str, str]]:
        """(checkpoint, attention) per layer: checkpoint 'gpu', 'host' or 'none' (not kept: no checkpointing, or a
        layer inside a segment whose input is rebuilt); attention 'gpu', 'host', 'recompute' or 'none'."""
        if not self.checkpointing:
            return [("none", "none")] * layers
        first_gpu, first_gpu_attention = layers - self.checkpoint_gpu_layers, layers - self.gpu_attention_layers
        rows = []
        for i in range(layers):
            starts = i % self.layers_per_checkpoint == 0
            checkpoint = ("gpu" if i >= first_gpu else "host") if starts else "none"
            if not self.cache_attention:
                attention = "recompute"
            elif i >= first_gpu_attention:
                attention = "gpu"
            else:
                attention = "host" if i < self.attention_host_layers else "recompute"
            rows.append((checkpoint, attention))
        return rows

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def memory_config_kwargs(choice: Choice, host_bytes: float, offload_min_bytes: int = 1 << 20) -> dict:
    """MemoryConfig's keyword arguments for `choice`; host_bytes: what the offloader may hold on the host (its
    budget reproduces the planned split of kept attention outputs)."""
    checkpointing = choice.checkpointing
    return dict(tiled_mlp=choice.tiled_mlp, tiled_norms=choice.tiled_norms, fuse_norms=choice.fuse_norms,
                tiled_loss=choice.tiled_loss, tile_memory_mib=choice.tile_memory_mib,
                attention_memory_mib=choice.attention_memory_mib, offload_checkpoints=checkpointing,
                cache_attention=checkpointing and choice.cache_attention,
                keep_last_layers_on_gpu=choice.checkpoint_gpu_layers if checkpointing else 0,
                keep_last_attention_on_gpu=choice.attention_gpu_layers if checkpointing else None,
                layers_per_checkpoint=choice.layers_per_checkpoint if checkpointing else 1,
                prefetch_after_attention=choice.prefetch_after_attention,
                host_memory_gib=math.ceil(host_bytes / _GIB * 1e6) / 1e6, offload_min_bytes=offload_min_bytes)


def to_memory_config(choice: Choice, host_bytes: float, offload_min_bytes: int = 1 << 20):
    """The MemoryConfig that runs `choice` (see memory_config_kwargs)."""
    from longseq import MemoryConfig

    return MemoryConfig(**memory_config_kwargs(choice, host_bytes, offload_min_bytes))
