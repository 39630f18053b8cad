"""The one object longseq keeps on a model: `LongseqState`, stored as the model's attribute `_longseq`.

longseq.apply attaches it to the CausalLM; apply_checkpoint_offload attaches one to the model it is given if there
is none yet. Every part of longseq that leaves something on a model fills its own field here, and reads the others'
from here, never through attributes of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longseq.loss import LossConfig
    from longseq.memory.checkpoint_offload import CheckpointOffloader
    from longseq.memory.config import MemoryConfig
    from longseq.mesh import Mesh
    from longseq.models.auto_memory import AutoPlanner
    from longseq.models.hybrid import LinearAttention
    from longseq.parallel.attention import Documents
    from longseq.router_loss import RouterLoad

_ATTRIBUTE = "_longseq"


@dataclass(kw_only=True, eq=False)
class LongseqState:
    """What longseq keeps on a model."""

    mesh: Mesh | None = None
    """The mesh longseq.apply was given; None where only memory features were applied (apply_memory)."""
    memory: MemoryConfig | None = None
    """The memory features in use; its loss passes them to the tiled loss. Under "auto" the object every wrapper
    reads, rewritten for each batch shape."""
    auto_memory: AutoPlanner | None = None
    """With longseq.apply(..., "auto"): the planner that writes each batch shape's plan into `memory` (Note
    [Automatic memory] in models/auto_memory.py); None otherwise."""
    loss: LossConfig | None = None
    """The loss options longseq.apply was given (label smoothing, z-loss); None: plain cross-entropy."""
    attention: str | None = None
    """The name of the attention function registered for this model (parallel/attention.py); None: the model's
    own attention runs."""
    documents: Documents | None = None
    """The registered attention function's document boundaries, gathered once per forward pass."""
    linear_attention: LinearAttention | None = None
    """The layout of the model's Gated DeltaNet layers and the current forward's plan (models/hybrid.py); None
    without such layers."""
    offloader: CheckpointOffloader | None = None
    """The checkpoint offloader; None without offload_checkpoints."""
    attention_cache: Callable | None = None
    """While a checkpointed layer runs: its compute-or-replay function for attention outputs, set by the checkpoint
    wrapper and passed on by the attention function (Note [Attention output cache]); None otherwise."""
    router_load: RouterLoad | None = None
    """While the loss entry point's forward runs on a mixture-of-experts model that adds the router loss: the router
    statistics its expert blocks add up (Note [Exact router load-balancing loss]); None otherwise."""


def longseq_state(model) -> LongseqState | None:
    """The state longseq keeps on `model` (read through a PEFT wrapper's attribute forwarding), or None."""
    return getattr(model, _ATTRIBUTE, None)


def attach_state(model) -> LongseqState:
    """`model`'s state, attached first if it has none."""
    state = longseq_state(model)
    if state is None:
        state = LongseqState()
        setattr(model, _ATTRIBUTE, state)
    return state
