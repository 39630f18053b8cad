"""A plan's choices, and the one function that turns them into longseq's MemoryConfig.

The canonical placement of checkpoints and kept attention outputs (what the offloader does today):

    layer:        0 … n_host_pairs−1 │ … │ L−n_gpu … L−1
    checkpoint:   host                │host│ GPU (keep_last_layers_on_gpu)
    attention:    kept on the host    │ kept on the GPU (attention_gpu_layers) │ recomputed │ kept on the GPU

The offloader keeps pairs for the earliest offloaded layers while its host budget has room (Note [Host budget]),
so giving it exactly the planned host bytes as `host_memory_gib` reproduces the planned split.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from longseq.plan.errors import PlanError

_GIB = 2**30

# Plan knobs that have no MemoryConfig field yet (issue 13), and the field that will carry each one.
PENDING_KNOBS = {"layers_per_checkpoint": "layers_per_checkpoint", "attention_gpu_layers": None}


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One configuration of longseq's memory features, placements and FSDP2 offload."""

    tiled_mlp: bool = True
    """MemoryConfig.tiled_mlp."""
    tiled_norms: bool = True
    """MemoryConfig.tiled_norms."""
    tiled_loss: bool = True
    """MemoryConfig.tiled_loss."""
    tile_memory_mib: int = 256
    """MemoryConfig.tile_memory_mib: one tile's largest intermediate."""
    checkpointing: bool = True
    """Checkpoint every decoder layer (MemoryConfig.offload_checkpoints); False keeps every layer's activations."""
    checkpoint_gpu_layers: int = 0
    """The last n layers keep their checkpoints on the GPU (MemoryConfig.keep_last_layers_on_gpu); the rest go to
    the host."""
    layers_per_checkpoint: int = 1
    """One checkpoint per k consecutive layers (nested recompute inside; issue 13)."""
    cache_attention: bool = True
    """Keep attention outputs and log-sum-exps for backward instead of recomputing attention."""
    attention_host_layers: int = 0
    """Offloaded layers (the first ones) whose kept attention outputs go to the host."""
    attention_gpu_layers: int = 0
    """Offloaded layers whose kept attention outputs stay on the GPU (issue 13)."""
    fsdp_cpu_offload: bool = False
    """FSDP2 keeps parameters, gradients and AdamW state on the host (`longseq train`'s training.cpu_offload)."""

    def placement(self, layers: int) -> list[tuple[str, str]]:
        """(checkpoint, attention) per layer: checkpoint 'gpu', 'host' or 'none' (not checkpointed; for k > 1 the
        layers inside a segment); attention 'gpu', 'host' or 'recompute'."""
        if not self.checkpointing:
            return [("none", "none")] * layers
        offloaded = layers - self.checkpoint_gpu_layers
        rows = []
        for i in range(layers):
            if i >= offloaded:
                rows.append(("gpu", "gpu" if self.cache_attention else "recompute"))
                continue
            inner = "host" if i % self.layers_per_checkpoint == 0 else "none"
            if not self.cache_attention:
                rows.append((inner, "recompute"))
            elif i < self.attention_host_layers:
                rows.append((inner, "host"))
            elif i < self.attention_host_layers + self.attention_gpu_layers:
                rows.append((inner, "gpu"))
            else:
                rows.append((inner, "recompute"))
        return rows

    def pending_knobs(self) -> list[str]:
        """Knobs this choice uses that the installed MemoryConfig does not have yet."""
        fields = memory_config_fields()
        used = {"layers_per_checkpoint": self.layers_per_checkpoint != 1,
                "attention_gpu_layers": self.attention_gpu_layers != 0}
        return [k for k, on in used.items() if on and PENDING_KNOBS[k] not in fields]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def memory_config_fields() -> set[str]:
    from longseq import MemoryConfig

    return {f.name for f in dataclasses.fields(MemoryConfig)}


def available_knobs() -> frozenset[str]:
    """The pending knobs the installed MemoryConfig already carries (the search may use these)."""
    fields = memory_config_fields()
    return frozenset(k for k, name in PENDING_KNOBS.items() if name in fields)


def memory_config_kwargs(choice: Choice, host_bytes: float, offload_min_bytes: int = 1 << 20) -> dict:
    """MemoryConfig's keyword arguments for `choice`; host_bytes: what the offloader may hold on the host (its
    budget reproduces the planned split of kept attention outputs)."""
    pending = choice.pending_knobs()
    if pending:
        raise PlanError(f"this plan uses {', '.join(pending)}, which MemoryConfig does not have yet (issue 13); "
                        "plan without it (the default) or update longseq.")
    kwargs = dict(tiled_mlp=choice.tiled_mlp, tiled_norms=choice.tiled_norms, tiled_loss=choice.tiled_loss,
                  tile_memory_mib=choice.tile_memory_mib, offload_checkpoints=choice.checkpointing,
                  cache_attention=choice.checkpointing and choice.cache_attention,
                  keep_last_layers_on_gpu=choice.checkpoint_gpu_layers if choice.checkpointing else 0,
                  host_memory_gib=math.ceil(host_bytes / _GIB * 1e6) / 1e6, offload_min_bytes=offload_min_bytes)
    if choice.layers_per_checkpoint != 1:
        kwargs[PENDING_KNOBS["layers_per_checkpoint"]] = choice.layers_per_checkpoint
    return kwargs


def to_memory_config(choice: Choice, host_bytes: float, offload_min_bytes: int = 1 << 20):
    """The MemoryConfig that runs `choice` (see memory_config_kwargs)."""
    from longseq import MemoryConfig

    return MemoryConfig(**memory_config_kwargs(choice, host_bytes, offload_min_bytes))
