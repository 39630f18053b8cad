"""MemoryConfig: the single-GPU memory features and their knobs, documented per field and validated."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20  # tile_memory_mib's unit


@dataclass(kw_only=True)
class MemoryConfig:
    """Single-GPU memory features; each composes with sequence parallelism. Defaults: all on, for long sequences."""

    tiled_mlp: bool = True
    """Run each decoder layer's MLP over sequence tiles; backward recomputes one tile at a time."""
    tiled_norms: bool = True
    """Recompute each decoder layer's RMSNorms in backward, tile by tile, instead of keeping their fp32 copies."""
    tiled_loss: bool = True
    """Compute lm_head + cross-entropy over token tiles; the full logits never exist."""
    offload_checkpoints: bool = True
    """Checkpoint every decoder layer and keep its saved input in (pinned) host memory until backward."""
    cache_attention: bool = True
    """With offload_checkpoints: keep each layer's attention output and log-sum-exp beside its checkpoint, so backward
    does not recompute attention (about 1/4.5 of attention work); doubles the checkpoints' host memory."""
    tile_memory_mib: int = 256
    """Memory target for one tile's largest intermediate (MLP activation or fp32 logits); sets the tile size."""
    tile_tokens: int | None = None
    """Fixed tile size (sequence positions per tile) for the MLP and the loss; overrides tile_memory_mib when set."""
    keep_last_layers_on_gpu: int = 0
    """Checkpoints of the last k layers stay on the GPU (they are needed first in backward)."""
    expandable_segments: bool = True
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set the allocator config themselves."""
    offload_min_bytes: int = 1 << 20
    """Saved tensors smaller than this stay on the GPU: copying them costs more than the memory they free."""
    host_memory_gib: float | None = None
    """Host memory this process may fill with offloaded checkpoints and kept attention outputs; beyond it, attention
    is recomputed and then checkpoints stay on the GPU. None: this process's share of the host (90% of it over the
    processes on the host), less what the process holds at its first forward and what the trainer reserves for its
    CPU-offloaded gradients and optimizer state (Note [Host budget] in memory/host_budget.py)."""

    def __post_init__(self) -> None:
        if self.tile_memory_mib < 1:
            raise ValueError(f"MemoryConfig.tile_memory_mib={self.tile_memory_mib} must be at least 1.")
        if self.tile_tokens is not None and self.tile_tokens < 1:
            raise ValueError(f"MemoryConfig.tile_tokens={self.tile_tokens} must be a positive number of tokens.")
        if self.keep_last_layers_on_gpu < 0:
            raise ValueError(f"MemoryConfig.keep_last_layers_on_gpu={self.keep_last_layers_on_gpu} must be >= 0.")
        if self.offload_min_bytes < 0:
            raise ValueError(f"MemoryConfig.offload_min_bytes={self.offload_min_bytes} must be >= 0 (0 moves all).")
        if self.host_memory_gib is not None and self.host_memory_gib < 0:
            raise ValueError(f"MemoryConfig.host_memory_gib={self.host_memory_gib} must be >= 0 (None: automatic).")
