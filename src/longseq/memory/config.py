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
    fuse_norms: bool = True
    """With tiled_norms: the layers that read a decoder layer's norm (the attention's input projections, the tiled MLP)
    recompute it tile by tile from its input instead of keeping its output for backward: one activation of hidden
    size less per norm (16 KiB per token at the peak for Llama-3-8B), for one more norm forward per reader and the
    projections' forward once more in backward (Note [Tiled compute])."""
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
    layers_per_checkpoint: int = 1
    """With offload_checkpoints: one offloaded checkpoint per this many consecutive layers; backward rebuilds the
    other layers' inputs from it by running the segment's layers forward once more, and holds at most this many layer
    inputs on the GPU meanwhile. Divides the checkpoints' host memory by it (Note [Checkpoint segments])."""
    keep_last_layers_on_gpu: int = 0
    """Checkpoints of the last k layers stay on the GPU (they are needed first in backward); with
    layers_per_checkpoint, those of the segments that start in them. Also the default of keep_last_attention_on_gpu."""
    keep_last_attention_on_gpu: int | None = None
    """With cache_attention: the kept attention outputs (and log-sum-exp) of the last k layers stay on the GPU
    instead of going to the host (they cost no host budget and no copies, but GPU memory of the layer input's size
    each); None: keep_last_layers_on_gpu."""
    prefetch_after_attention: bool = True
    """With offload_checkpoints and cache_attention: start bringing back the previous checkpoint once the next layer's
    attention backward is done, and a kept attention output when its layer's recompute starts, instead of both one
    layer ahead at the start of the next layer's recompute: two layer inputs' worth less at the attention backward
    (16 KiB per token for Llama-3-8B), with less compute to hide the copies behind (Note [Checkpoint offload])."""
    expandable_segments: bool = True
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set the allocator config themselves."""
    offload_min_bytes: int = 1 << 20
    """Saved tensors smaller than this stay on the GPU: copying them costs more than the memory they free."""
    attention_memory_mib: int = 1024
    """Memory target for the buffers of one attention kernel call in backward (dq, dk, dv of the K/V heads expanded
    for the call, the kernel's fp32 accumulator): longseq's attention kernels take as many heads per call as fit it,
    so these buffers stay near this size instead of growing with heads × tokens (Note [Attention head groups] in
    parallel/head_groups.py). Smaller: less memory, more and smaller kernel launches."""
    attention_heads_per_call: int | None = None
    """Query heads per attention kernel call (rounded down to a whole number of K/V heads, or a divisor of the query
    heads per K/V head); overrides attention_memory_mib when set."""
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
        if self.keep_last_attention_on_gpu is not None and self.keep_last_attention_on_gpu < 0:
            raise ValueError(f"MemoryConfig.keep_last_attention_on_gpu={self.keep_last_attention_on_gpu} must be >= 0 "
                             "(None: as keep_last_layers_on_gpu).")
        if self.layers_per_checkpoint < 1:
            raise ValueError(f"MemoryConfig.layers_per_checkpoint={self.layers_per_checkpoint} must be >= 1 "
                             "(1: one checkpoint per layer).")
        if self.offload_min_bytes < 0:
            raise ValueError(f"MemoryConfig.offload_min_bytes={self.offload_min_bytes} must be >= 0 (0 moves all).")
        if self.attention_memory_mib < 1:
            raise ValueError(f"MemoryConfig.attention_memory_mib={self.attention_memory_mib} must be at least 1.")
        if self.attention_heads_per_call is not None and self.attention_heads_per_call < 1:
            raise ValueError(f"MemoryConfig.attention_heads_per_call={self.attention_heads_per_call} must be >= 1 "
                             "(None: from attention_memory_mib).")
        if self.host_memory_gib is not None and self.host_memory_gib < 0:
            raise ValueError(f"MemoryConfig.host_memory_gib={self.host_memory_gib} must be >= 0 (None: automatic).")
