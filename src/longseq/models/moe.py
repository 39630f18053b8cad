"""Mixture-of-experts decoders: the families longseq runs exactly, and what it puts on their expert blocks.

Each expert block's forward is wrapped once (apply_experts). The wrapper runs the block (over sequence tiles with
MemoryConfig.tiled_mlp, Note [Tiled experts]), reads the router's logits as the block computes them (a forward hook
on the module transformers records router logits from), and, where the model adds the router's load-balancing loss
(config.output_router_logits), adds the block's router statistics to the forward's RouterLoad (Note [Exact router
load-balancing loss]). The statistics are computed the same way in a checkpoint's recompute, where no RouterLoad is
open, so the recompute saves the tensors the forward saved.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from longseq.memory.config import MemoryConfig
from longseq.memory.tiled import mlp_tile_tokens, tiled
from longseq.memory.tiled_moe import tiled_experts
from longseq.models.anatomy import decoder_expert_blocks, router_class
from longseq.router_loss import RouterLoad, router_statistics
from longseq.state import LongseqState


@dataclass(frozen=True)
class ExpertFamily:
    """What longseq needs to know of one family's expert blocks beyond what transformers declares."""

    expert_intermediate: str
    """The config field holding one expert's intermediate size (sets the tile size)."""
    returns_router_scores: bool = False
    """The block returns (hidden, router scores) instead of hidden alone; its decoder layer drops the scores."""


FAMILIES = {
    "qwen3_moe": ExpertFamily("moe_intermediate_size"),
    "mixtral": ExpertFamily("intermediate_size"),
    "gpt_oss": ExpertFamily("intermediate_size", returns_router_scores=True),
}
"""model_type → its expert blocks; checked against transformers 5.17 and 5.24 (tests/test_moe.py)."""


def expert_family(causal) -> ExpertFamily | None:
    """The family of a mixture-of-experts CausalLM; None for a dense one, and for another family whose router loss
    is off (its expert blocks are per-token, so they run exactly as they are, untiled); a clear error for another
    family with the router loss on."""
    if not decoder_expert_blocks(causal):
        return None
    model_type = causal.config.model_type
    if model_type in FAMILIES and router_class(causal) is not None:
        return FAMILIES[model_type]
    if getattr(causal.config, "output_router_logits", False):
        raise ValueError(
            f"longseq computes the router load-balancing loss exactly for the mixture-of-experts families "
            f"{sorted(FAMILIES)}; {model_type!r} is not one of them, and its config sets output_router_logits=True. "
            "Set config.output_router_logits = False (its expert blocks then run untiled), or add the family to "
            "longseq.models.moe.FAMILIES with a test against the unsharded model."
        )
    return None


def new_router_load(causal, token_mask: torch.Tensor | None) -> RouterLoad:
    config = causal.config
    return RouterLoad(num_experts=config.num_experts, top_k=config.num_experts_per_tok, token_mask=token_mask)


class _RouterTap:
    """Records the router's logits (its output[0]) while a block runs."""

    def __init__(self, router: nn.Module):
        self.router, self.logits = router, []

    def __enter__(self):
        self.handle = self.router.register_forward_hook(lambda module, args, output: self.logits.append(output[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def single(self) -> torch.Tensor:
        if len(self.logits) != 1:
            raise RuntimeError(f"longseq: an expert block called its router {len(self.logits)} times; expected once.")
        return self.logits[0]


class ExpertBlock:
    """The wrapper on one expert block: its own forward, router, family and the model's state and config. The
    block's parameters are read at each call: FSDP2 swaps in the unsharded ones for the layer's forward."""

    def __init__(self, block: nn.Module, router: type, family: ExpertFamily, state: LongseqState, config, memory):
        routers = [m for m in block.modules() if isinstance(m, router)]
        if len(routers) != 1:
            raise ValueError(f"longseq: expected one router in {type(block).__name__}, found {len(routers)}.")
        self.inner, self.router, self.family = block.forward, routers[0], family
        self.state, self.config, self.memory = state, config, memory

    def __call__(self, block: nn.Module, x: torch.Tensor):
        collect = bool(self.config.output_router_logits)
        load = self.state.router_load
        mask = None if load is None else _checked_mask(load.token_mask, x)
        tile = self._tile_tokens(x)
        if tile is None or x.shape[-2] <= tile:
            with _RouterTap(self.router) as tap:
                result = self.inner(x)
            if collect:  # also without an open RouterLoad (a checkpoint's recompute saves what its forward saved)
                statistics = router_statistics(tap.single(), _flat(mask), self.config.num_experts_per_tok)
                if load is not None:
                    load.add(*statistics)
            return result
        params = [p for p in block.parameters() if p.requires_grad]
        if collect:
            out, probabilities, tally = tiled_experts(self._run, x, mask, *params, tile_tokens=tile)
            if load is not None:
                load.add(probabilities, tally)
        else:
            out = tiled(lambda t: self._hidden(self.inner(t)), x, *params, tile_tokens=tile)
        return (out, None) if self.family.returns_router_scores else out

    def _run(self, x_tile: torch.Tensor, mask_rows: torch.Tensor | None):
        with _RouterTap(self.router) as tap:
            out = self._hidden(self.inner(x_tile))
        return (out, *router_statistics(tap.single(), mask_rows, self.config.num_experts_per_tok))

    def _hidden(self, result):
        return result[0] if self.family.returns_router_scores else result

    def _tile_tokens(self, x: torch.Tensor) -> int | None:
        if self.memory is None or not self.memory.tiled_mlp:
            return None
        intermediate = self.config.num_experts_per_tok * getattr(self.config, self.family.expert_intermediate)
        return mlp_tile_tokens(self.memory, intermediate, x[..., 0, 0].numel(), x.dtype)


def _flat(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(-1)


def _checked_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"token_mask of shape {tuple(mask.shape)} does not match the expert block's input {tuple(x.shape)}; pass "
            "the token_mask that longseq.shard_batch made for this batch."
        )
    return mask


def _wrapped_forward(self: nn.Module, hidden_states: torch.Tensor):
    return self._longseq_experts(self, hidden_states)


def apply_experts(causal, state: LongseqState, memory: MemoryConfig | None) -> ExpertFamily | None:
    """Wrap every expert block of `causal` (no-op for a dense model); returns the family, or None if dense."""
    family = expert_family(causal)
    if family is None:
        return None
    config = causal.config
    recomputes = memory is not None and (memory.tiled_mlp or memory.offload_checkpoints)
    if recomputes and getattr(config, "router_jitter_noise", 0.0):
        raise ValueError(
            f"router_jitter_noise={config.router_jitter_noise} multiplies each expert block's input by fresh random "
            "noise, and longseq recomputes expert blocks in backward (MemoryConfig.tiled_mlp, offload_checkpoints), "
            "which would draw other noise. Set config.router_jitter_noise = 0, or switch both features off."
        )
    for block in decoder_expert_blocks(causal):
        if hasattr(block, "_longseq_experts"):
            raise ValueError("longseq's expert-block wrapper was already applied to this model; apply it once.")
        block._longseq_experts = ExpertBlock(block, router_class(causal), family, state, config, memory)
        block.forward = types.MethodType(_wrapped_forward, block)
    return family
