"""Mixture-of-experts blocks over sequence tiles, with their router statistics.

Note [Tiled experts]
~~~~~~~~~~~~~~~~~~~~
An expert block (router → top-k experts → weighted sum) is per-token like a dense MLP, so it tiles the same way
(Note [Tiled compute]): forward runs the whole block, router included, on one tile at a time without keeping
anything but the input; backward recomputes one tile at a time and sums the expert and router weights' gradients
over tiles in fp32 (ParameterGradients). The largest intermediates are about top_k × tokens × expert intermediate
size, three times over (gate, up, their product), so the tile size follows from the same memory target as the MLP's.

The block also reports its router statistics (Note [Exact router load-balancing loss]): per tile, the summed
softmax of the router logits p (differentiable) and the assignment counts and row count (not). They are sums over
tokens, so the tiles' sums add up to the block's:

    forward:   out[t], p_t, tally_t = run(x[t], mask[t]);   p = Σ_t p_t,  tally = Σ_t tally_t
    backward:  recompute tile t with grad; dx[t], dθ += autograd.grad((out[t], p_t), (x[t], θ), (dout[t], dp))

The mask of counted rows stays on ctx and is not saved (a checkpoint's recompute cannot change it); the output's
gradient and p's reach each tile in one autograd.grad call. Tiles are made contiguous (Mixtral's block `view`s its
input).
"""

from __future__ import annotations

import torch

from longseq.memory.tiled import ParameterGradients, tile_ranges


def _rows(mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """The mask of the rows of tile [start, end) in the order the block flattens them: (batch, tile) → batch·tile."""
    return None if mask is None else mask[:, start:end].reshape(-1)


class TiledExpertsFunction(torch.autograd.Function):
    """run over tiles of x along dim −2, its router statistics summed; see Note [Tiled experts].

    run(x_tile, mask_rows) -> (out_tile, p (E,) fp32, tally (E + 1,) fp32).
    """

    @staticmethod
    def forward(ctx, run, tile_tokens, mask, x, *params):
        ctx.run, ctx.tile_tokens, ctx.mask = run, tile_tokens, mask
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, *params)
        out = probabilities = tally = None
        for start, end in tile_ranges(x.shape[-2], tile_tokens):
            piece, p, t = run(x[..., start:end, :].contiguous(), _rows(mask, start, end))
            if out is None:
                out = piece.new_empty(*piece.shape[:-2], x.shape[-2], piece.shape[-1])
                probabilities, tally = p, t
            else:
                probabilities, tally = probabilities + p, tally + t
            out[..., start:end, :] = piece
        ctx.mark_non_differentiable(tally)
        return out, probabilities, tally

    @staticmethod
    def backward(ctx, grad_out, grad_probabilities, _grad_tally):
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[3]
        sums = ParameterGradients(params, ctx.needs_input_grad[4:])
        grad_x = torch.zeros_like(x) if need_x else None
        for start, end in tile_ranges(x.shape[-2], ctx.tile_tokens):
            x_tile = x[..., start:end, :].detach().contiguous().requires_grad_(need_x)
            with torch.enable_grad():
                piece, p, _ = ctx.run(x_tile, _rows(ctx.mask, start, end))
            outputs, grads_in = [], []
            if grad_out is not None:
                outputs.append(piece)
                grads_in.append(grad_out[..., start:end, :])
            if grad_probabilities is not None:
                outputs.append(p)
                grads_in.append(grad_probabilities)
            if not outputs:
                break
            inputs = ([x_tile] if need_x else []) + sums.wanted
            grads = torch.autograd.grad(outputs, inputs, grads_in, allow_unused=True)
            if need_x and grads[0] is not None:
                grad_x[..., start:end, :] = grads[0]
            sums.add(grads[need_x:])
        return (None, None, None, grad_x, *sums.result())


def tiled_experts(run, x: torch.Tensor, mask: torch.Tensor | None, *params: torch.Tensor, tile_tokens: int):
    """(out, p, tally) of an expert block over tiles of `tile_tokens` positions of x (batch, tokens, hidden).

    run(x_tile, mask_rows) -> (out_tile, p, tally) computes one tile and its router statistics; mask (batch, tokens)
    marks the rows that count (None: all). Pass every tensor run uses that needs a gradient as `params`.
    """
    if tile_tokens < 1:
        raise ValueError(f"tiled_experts(tile_tokens={tile_tokens}) must be a positive number of tokens.")
    return TiledExpertsFunction.apply(run, tile_tokens, mask, x, *params)
