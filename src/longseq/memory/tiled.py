"""Sequence-tiled compute for per-token modules: the MLP and the RMSNorms of every decoder layer.

Note [Tiled compute]
~~~~~~~~~~~~~~~~~~~~
A per-token module (the MLP: down(act(gate(x)) * up(x))) never mixes positions, so it can run over sequence tiles.
Its largest intermediate is tokens × intermediate_size (Llama-3-8B: 14336 wide, three such tensors live at once in
backward): at 128k tokens in bf16 that is 3 × 3.7 GB. Tiled, only one tile's intermediates exist at a time:

    forward  (no_grad):  out[t] = fn(x[t])                        for t = 0..T-1, nothing saved but x
    backward:            with grad: o = fn(x[t]);  dx[t], dθ += autograd.grad(o, (x[t], θ), dout[t])

The parameters θ are explicit inputs of the autograd.Function, so autograd hands each one its gradient exactly
once, through its ordinary accumulation. Under FSDP2 the unsharded parameters exist only during the layer's
forward/backward and their gradients are reduce-scattered by FSDP's hooks; writing `.grad` by hand would bypass
that, so we never do. Parameter gradients sum over tiles in fp32 (at least) and are rounded to the parameter's
dtype once: summed in bf16 they would round once per tile (at 128 tiles, 3× the error of the untiled bf16 MLP's
gradient). The accumulator costs 4 bytes per MLP parameter of the one layer in backward (0.7 GB for Llama-3-8B).

The backward recomputes fn without restoring the RNG state: a module with dropout would draw different masks in
the recompute. HF decoder MLPs have no dropout (and LoRA's default lora_dropout is 0), so we do not pay for it.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from longseq.memory.config import MIB, MemoryConfig
from longseq.models.anatomy import decoder_expert_blocks, decoder_mlps, decoder_norms


def tile_ranges(length: int, tile: int) -> list[tuple[int, int]]:
    """[start, end) of each tile of `tile` positions over `length` positions."""
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


class TiledFunction(torch.autograd.Function):
    """fn over tiles of x along dim -2; see Note [Tiled compute]."""

    @staticmethod
    def forward(ctx, fn, tile_tokens, x, *params):
        ctx.fn, ctx.tile_tokens = fn, tile_tokens
        ctx.save_for_backward(x, *params)
        out = None
        for start, end in tile_ranges(x.shape[-2], tile_tokens):
            piece = fn(x[..., start:end, :])
            if out is None:
                out = piece.new_empty(*piece.shape[:-2], x.shape[-2], piece.shape[-1])
            out[..., start:end, :] = piece
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        sums = ParameterGradients(params, ctx.needs_input_grad[3:])
        grad_x = torch.empty_like(x) if need_x else None
        for start, end in tile_ranges(x.shape[-2], ctx.tile_tokens):
            x_tile = x[..., start:end, :].detach().requires_grad_(need_x)
            with torch.enable_grad():
                out = ctx.fn(x_tile)
            inputs = ([x_tile] if need_x else []) + sums.wanted
            grads = torch.autograd.grad(out, inputs, grad_out[..., start:end, :], allow_unused=True)
            if need_x:
                grad_x[..., start:end, :] = grads[0]
            sums.add(grads[need_x:])
        return (None, None, grad_x, *sums.result())


class ParameterGradients:
    """Parameter gradients summed over tiles in fp32 (at least) and rounded to each parameter's dtype once
    (Note [Tiled compute])."""

    def __init__(self, params, needs_grad):
        self.needs_grad = list(needs_grad)
        self.wanted = [p for p, need in zip(params, self.needs_grad) if need]
        self.sums: list[torch.Tensor | None] = [None] * len(self.wanted)

    def add(self, grads) -> None:
        """One tile's gradients of `wanted` (None where a parameter took no part)."""
        for i, g in enumerate(grads):
            if g is not None:
                if self.sums[i] is None:
                    self.sums[i] = g.to(torch.promote_types(g.dtype, torch.float32))
                else:
                    self.sums[i].add_(g)

    def result(self) -> tuple:
        """One entry per parameter given: its summed gradient in its dtype, or None."""
        rounded = iter(g if g is None else g.to(p.dtype) for g, p in zip(self.sums, self.wanted))
        return tuple(next(rounded) if need else None for need in self.needs_grad)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *params: torch.Tensor, tile_tokens: int):
    """fn(x) computed over tiles of `tile_tokens` positions along dim -2 of x ((B, S, H) or (S, H)).

    fn must be per-token (no mixing along dim -2). Pass every tensor that fn uses and that needs a gradient as
    `params` (e.g. the module's parameters): their gradients arrive through autograd, see Note [Tiled compute].
    """
    if tile_tokens < 1:
        raise ValueError(f"tiled(tile_tokens={tile_tokens}) must be a positive number of tokens.")
    if x.shape[-2] <= tile_tokens:
        return fn(x)
    return TiledFunction.apply(fn, tile_tokens, x, *params)


def _intermediate_size(mlp: nn.Module) -> int:
    size = getattr(mlp, "intermediate_size", None)
    if isinstance(size, int):
        return size
    return max(max(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear))


def mlp_tile_tokens(config: MemoryConfig, intermediate_size: int, batch: int, dtype: torch.dtype) -> int:
    """Positions per tile: config.tile_tokens, else the largest tile whose intermediates fit tile_memory_mib.

    A tile of `batch × t` tokens holds about three (batch·t × intermediate_size) tensors at once (gate, up, and
    their product or its gradient).
    """
    if config.tile_tokens is not None:
        return config.tile_tokens
    per_position = batch * intermediate_size * 3 * torch.empty((), dtype=dtype).element_size()
    return max(1, config.tile_memory_mib * MIB // per_position)


def norm_tile_tokens(config: MemoryConfig, hidden_size: int, batch: int) -> int:
    """Positions per tile: config.tile_tokens, else the largest tile whose intermediates fit tile_memory_mib.

    An RMSNorm keeps fp32 copies of its input for backward (16 bytes per hidden unit and token in Llama's); recomputed
    per tile, only the input itself is kept. A tile of `batch × t` tokens holds about three fp32 (batch·t × hidden)
    tensors at once.
    """
    if config.tile_tokens is not None:
        return config.tile_tokens
    per_position = batch * hidden_size * 3 * 4
    return max(1, config.tile_memory_mib * MIB // per_position)


def _tiled_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plain = self._longseq_inner_forward
    batch = x[..., 0, 0].numel()
    tile = mlp_tile_tokens(self._longseq_tile_config, self._longseq_intermediate, batch, x.dtype)
    if x.shape[-2] <= tile:
        return plain(x)
    params = [p for p in self.parameters() if p.requires_grad]
    return tiled(plain, x, *params, tile_tokens=tile)


def _tiled_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plain = self._longseq_inner_forward
    tile = norm_tile_tokens(self._longseq_tile_config, x.shape[-1], x[..., 0, 0].numel())
    params = [p for p in self.parameters() if p.requires_grad]
    return TiledFunction.apply(plain, tile, x, *params) if torch.is_grad_enabled() else plain(x)


def apply_tiled_norms(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Recompute the token-wise norms of each decoder layer (and the final norm) in backward, tile by tile.

    Only norms over the hidden dimension are wrapped (per-head q/k norms work on (B, H, S, D) and stay as they are).
    """
    norms = decoder_norms(model)
    if any(hasattr(norm, "_longseq_tile_config") for norm in norms):
        raise ValueError("apply_tiled_norms was already applied to this model; apply it once.")
    for norm in norms:
        norm._longseq_tile_config = config
        norm._longseq_inner_forward = norm.forward
        norm.forward = types.MethodType(_tiled_norm_forward, norm)
    return model


def apply_tiled_mlp(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Run every decoder layer's dense MLP over sequence tiles (Note [Tiled compute]); returns the model. Expert
    blocks are tiled by longseq.apply (models/moe.py, Note [Tiled experts]), which also collects their router
    statistics."""
    mlps = decoder_mlps(model)
    if not mlps and not decoder_expert_blocks(model):
        raise ValueError(
            f"MemoryConfig.tiled_mlp=True, but no decoder layer of {type(model).__name__} has an `mlp` whose class "
            "name ends in 'MLP', nor a mixture-of-experts block. Set tiled_mlp=False for this model."
        )
    if any(hasattr(mlp, "_longseq_tile_config") for mlp in mlps):
        raise ValueError("apply_tiled_mlp was already applied to this model; apply it once.")
    for mlp in mlps:
        mlp._longseq_tile_config = config
        mlp._longseq_intermediate = _intermediate_size(mlp)
        mlp._longseq_inner_forward = mlp.forward  # the class's, or whatever an earlier wrapper installed
        mlp.forward = types.MethodType(_tiled_mlp_forward, mlp)
    return model
