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

Norms fused into their readers: a decoder layer's norm output (B × S × H) is kept for backward by whatever reads it
(the q/k/v projections keep it for their weight gradients, the MLP for its recompute), 8 KiB per token each for the
8B shape. With MemoryConfig.fuse_norms, a tiled norm remembers (weakly) its latest output and input; a reader that is
handed that output runs fn = reader ∘ norm over tiles of the norm's INPUT instead, so only that input (the layer's
residual stream, alive anyway) is kept, and backward recomputes the norm per tile with the reader. The norm's own
node then feeds nothing and never runs in backward. Cost: one more norm forward per reader, and for the projections
their forward once more in backward (the MLP recomputes its forward anyway).

The backward recomputes fn without restoring the RNG state: a module with dropout would draw different masks in
the recompute. HF decoder MLPs have no dropout (and LoRA's default lora_dropout is 0), so we do not pay for it.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
from torch import nn

from longseq.memory.config import MIB, MemoryConfig
from longseq.models.anatomy import (attention_input_projections, decoder_expert_blocks, decoder_layers, decoder_mlps,
                                    decoder_norms, layer_norms)


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
    plain, config = self._longseq_inner_forward, self._longseq_tile_config
    if not config.tiled_mlp:  # switched off for this batch shape (Note [Automatic memory])
        return plain(x)
    batch = x[..., 0, 0].numel()
    tile = mlp_tile_tokens(config, self._longseq_intermediate, batch, x.dtype)
    if x.shape[-2] <= tile:
        return plain(x)
    fused = _through_norm(self, plain, x, tile) if _fuses_norms(config) else None
    if fused is not None:
        return fused
    params = [p for p in self.parameters() if p.requires_grad]
    return tiled(plain, x, *params, tile_tokens=tile)


def _tiled_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plain, config = self._longseq_inner_forward, self._longseq_tile_config
    if not (config.tiled_norms and torch.is_grad_enabled()):
        return plain(x)
    tile = norm_tile_tokens(config, x.shape[-1], x[..., 0, 0].numel())
    params = [p for p in self.parameters() if p.requires_grad]
    out = TiledFunction.apply(plain, tile, x, *params)
    if config.fuse_norms:
        self._longseq_output = (weakref.ref(out), weakref.ref(x))
    return out


def _tiled_reader_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A linear layer that reads a norm's output (an attention input projection): fused with the norm when it is
    handed the output of one (Note [Tiled compute])."""
    plain = self._longseq_inner_forward
    if args or kwargs or not torch.is_grad_enabled() or not _fuses_norms(self._longseq_tile_config):
        return plain(x, *args, **kwargs)
    tile = norm_tile_tokens(self._longseq_tile_config, x.shape[-1], x[..., 0, 0].numel())
    fused = _through_norm(self, plain, x, tile) if x.shape[-2] > tile else None
    return plain(x) if fused is None else fused


def _fuses_norms(config: MemoryConfig) -> bool:
    """Whether the norms' readers recompute them (read at each call: the config may change between batch shapes,
    Note [Automatic memory] in models/auto_memory.py)."""
    return config.tiled_norms and config.fuse_norms


def _through_norm(reader: nn.Module, plain, x: torch.Tensor, tile: int) -> torch.Tensor | None:
    """reader(x) computed as reader(norm(source)) over tiles of source, where x is the latest output of one of the
    reader's layer norms and source that norm's input; None when x is not such an output (Note [Tiled compute])."""
    for norm in reader._longseq_norms:
        made = getattr(norm, "_longseq_output", None)
        source = made[1]() if made is not None and made[0]() is x else None
        if source is not None:
            through = norm._longseq_inner_forward
            params = [p for m in (norm, reader) for p in m.parameters() if p.requires_grad]
            return TiledFunction.apply(lambda t: plain(through(t)), tile, source, *params)
    return None


def apply_tiled_norms(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Recompute the token-wise norms of each decoder layer (and the final norm) in backward, tile by tile; with
    config.fuse_norms, also inside the layers that read them (Note [Tiled compute]).

    Only norms over the hidden dimension are wrapped (per-head q/k norms work on (B, H, S, D) and stay as they are).
    """
    norms = decoder_norms(model)
    if any(hasattr(norm, "_longseq_tile_config") for norm in norms):
        raise ValueError("apply_tiled_norms was already applied to this model; apply it once.")
    for norm in norms:
        _wrap(norm, config, _tiled_norm_forward)
    for layer in decoder_layers(model):
        readers = attention_input_projections(layer) if config.fuse_norms else []
        for reader in readers:
            _wrap(reader, config, _tiled_reader_forward)
        for reader in readers + [getattr(layer, "mlp", None)]:
            if reader is not None:
                reader._longseq_norms = layer_norms(layer) if config.fuse_norms else []
    return model


def _wrap(module: nn.Module, config: MemoryConfig, forward) -> None:
    module._longseq_tile_config = config
    module._longseq_inner_forward = module.forward  # the class's, or whatever an earlier wrapper installed
    module.forward = types.MethodType(forward, module)


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
        mlp._longseq_intermediate = _intermediate_size(mlp)
        mlp._longseq_norms = getattr(mlp, "_longseq_norms", [])
        _wrap(mlp, config, _tiled_mlp_forward)
    return model
