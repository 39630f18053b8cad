"""Tiled lm_head + cross-entropy: the (tokens × vocab) logits never exist whole.

Note [Tiled loss]
~~~~~~~~~~~~~~~~~
At 128k tokens and a 128k vocabulary the fp32 logits alone are 64 GB. We walk over token tiles:

    for each tile t of tokens:   z = float(h[t] @ Wᵀ + b)            (tile × V, fp32, as HF upcasts before CE)
                                 z = c·tanh(z / c)                  (Gemma-2/3 final_logit_softcapping)
                                 loss += Σ_valid (logsumexp(z) − z[label])
                                 dz = (softmax(z) − onehot(label)) · valid · (1 − tanh²)   (only with softcap)
                                 dh[t] = dz @ W;   dW += dzᵀ @ h[t];   db += Σ dz

Gradients are computed eagerly in the forward (as Liger's fused linear cross-entropy does) rather than by
recomputing the logits in backward: that is 3 matmuls of tokens × V × H instead of 4, and the buffers we keep
until backward (dh: tokens × H, dW: V × H) are the same size as what a recompute would keep (h) or build (dW).
Backward only scales them by the incoming scalar gradient (e.g. 1 / global valid count).

dW sums one partial product per tile. In bf16 that sum would round once per tile: with ~500 tiles (128k tokens,
tiles of ~260) the relative error grows to a few percent. So by default dW accumulates in fp32 and is cast once
at the end, which costs V × H × 4 bytes while the loss runs (Llama-3-8B: 128256 × 4096 × 4 = 2.1 GB);
`fp32_weight_grad=False` accumulates in the weight's dtype instead. The fp32 partial products are added one vocab
chunk at a time so no V × H temporary in bf16 appears either.

Each tile's add into the accumulator is a pass over V × H (2 GiB in fp32 for Llama-3's head), so the tile count,
not only the token count, sets the loss's cost: 2.4 ms a tile on an H200 (bench/bench_loss.py), 0.6 s of a 64K step
with 256 MiB tiles against 0.04 s with 4 GiB ones. Larger tiles (tile_memory_mib) trade GPU memory for that time;
the planner chooses (Note [Step time]).

Label smoothing, a z-loss and per-token weights change the per-token loss and dz as Note [Loss options] (loss.py)
gives; they stay inside the tile loop, so they cost no memory. A per-token loss vector (reduction="none") is not
offered: its gradient needs every token's incoming gradient, which is only known after the forward has gone.

Returning (sum, count) rather than a mean is what lets the caller form an exact global mean over sequence- and
data-parallel ranks: all-reduce both, then divide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longseq.loss import IGNORE_INDEX, LossConfig
from longseq.memory.config import MIB, MemoryConfig

_VOCAB_CHUNK = 8192


def loss_tile_tokens(vocab_size: int, tile_memory_mib: int) -> int:
    """Tokens per tile so that a tile's fp32 logits and their gradient (tile × V × 4 bytes × 2) fit the target."""
    return max(1, tile_memory_mib * MIB // (vocab_size * 4 * 2))


def _tile_loss(h, weight, bias, labels, token_weights, softcap, ignore_index, loss: LossConfig, want_grad):
    """Summed loss of one tile's valid tokens (Note [Loss options]) and, if wanted, d(sum)/d(logits) in fp32."""
    logits = F.linear(h, weight, bias).float()
    if softcap is not None:
        tanh = torch.tanh(logits.div_(softcap))
        logits = tanh * softcap
    valid = labels != ignore_index
    scale = valid.float() if token_weights is None else torch.where(valid, token_weights.float(), 0.0)
    target = torch.where(valid, labels, 0).unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    smoothing, vocab = loss.label_smoothing, logits.shape[-1]
    per_token = lse - (1 - smoothing) * logits.gather(-1, target).squeeze(-1)
    if smoothing:
        per_token -= smoothing / vocab * logits.sum(-1)
    if loss.z_loss:
        per_token += loss.z_loss * lse.square()
    total = torch.where(valid, per_token * scale, 0.0).sum()
    if not want_grad:
        return total, None
    grad = logits.sub_(lse.unsqueeze(-1)).exp_()
    if loss.z_loss:
        grad.mul_((1 + 2 * loss.z_loss * lse).unsqueeze(-1))
    grad.scatter_add_(-1, target, torch.full_like(lse, smoothing - 1).unsqueeze(-1))
    if smoothing:
        grad.sub_(smoothing / vocab)
    grad.mul_(scale.unsqueeze(-1))
    if softcap is not None:
        grad.mul_(1 - tanh.square_())
    return total, grad


def _add_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    if acc.dtype == h.dtype:
        acc.addmm_(grad_logits.t(), h)
        return
    for start in range(0, acc.shape[0], _VOCAB_CHUNK):
        acc[start : start + _VOCAB_CHUNK].add_(grad_logits[:, start : start + _VOCAB_CHUNK].t() @ h)


class TiledCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over valid tokens; grads computed eagerly per tile. See Note [Tiled loss]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, softcap, ignore_index, loss, tile_tokens,
                fp32_weight_grad, wants):
        want_h, want_w, want_b = wants
        acc_dtype = torch.float32 if fp32_weight_grad else weight.dtype
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], tile_tokens):
            tile = slice(start, start + tile_tokens)
            h = hidden[tile]
            tile_weights = None if token_weights is None else token_weights[tile]
            tile_sum, grad = _tile_loss(h, weight, bias, labels[tile], tile_weights, softcap, ignore_index, loss,
                                        any(wants))
            total += tile_sum
            if grad is None:
                continue
            if want_b:
                grad_b += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if want_h:
                grad_h[tile] = grad @ weight
            if want_w:
                _add_weight_grad(grad_w, grad, h)
        grads = [g for g in (grad_h, grad_w, grad_b) if g is not None]
        ctx.wants = wants
        ctx.save_for_backward(*(g.to(t.dtype) for g, t in zip(grads, _present(wants, hidden, weight, bias))))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved).mul_(grad_total) if want else None for want in ctx.wants]
        return (*grads, None, None, None, None, None, None, None, None)


def _present(wants, *tensors):
    return [t for want, t in zip(wants, tensors) if want]


def tiled_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    tile_tokens: int | None = None,
    tile_memory_mib: int = 256,
    fp32_weight_grad: bool = True,
    loss: LossConfig | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token losses over valid tokens in fp32, number of valid tokens), logits built tile by tile.

    hidden: (B, S, H) or (N, H), the final hidden states. weight: lm_head weight (V, H) (the embedding matrix when
    tied). labels: already shifted (the target of token t sits at t), `ignore_index` marks tokens without a target.
    tile_tokens defaults to loss_tile_tokens(V, tile_memory_mib). loss: label smoothing and z-loss; weights: one
    constant per label (Note [Loss options]). See Note [Tiled loss].
    """
    if reduction != "sum":
        raise ValueError(
            f"tiled_cross_entropy_sum(reduction={reduction!r}) is not supported: the tiled loss computes its gradient "
            "during the forward, for one summed objective. Weight tokens with weights=..., or set "
            "MemoryConfig.tiled_loss=False and reduce the full logits yourself."
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if flat_labels.shape[0] != flat_hidden.shape[0]:
        raise ValueError(
            f"tiled_cross_entropy_sum: labels {tuple(labels.shape)} must have one entry per token of hidden "
            f"{tuple(hidden.shape)}; pass labels already shifted, of shape hidden.shape[:-1]."
        )
    flat_weights = None if weights is None else _token_weights(weights, labels)
    tile = tile_tokens if tile_tokens is not None else loss_tile_tokens(weight.shape[0], tile_memory_mib)
    if tile < 1:
        raise ValueError(f"tiled_cross_entropy_sum(tile_tokens={tile_tokens}) must be a positive number of tokens.")
    grad_on = torch.is_grad_enabled()
    wants = tuple(grad_on and t is not None and t.requires_grad for t in (flat_hidden, weight, bias))
    loss_sum = TiledCrossEntropy.apply(
        flat_hidden, weight, bias, flat_labels, flat_weights, softcap, ignore_index, loss or LossConfig(), tile,
        fp32_weight_grad, wants
    )
    return loss_sum, (flat_labels != ignore_index).sum()


def _token_weights(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if weights.shape != labels.shape:
        raise ValueError(f"tiled_cross_entropy_sum: weights {tuple(weights.shape)} must have the labels' shape "
                         f"{tuple(labels.shape)} (one weight per label, shifted like the labels).")
    if weights.requires_grad:
        raise ValueError("tiled_cross_entropy_sum: weights must be constants (the tiled loss computes no gradient for "
                         "them); pass weights.detach().")
    return weights.reshape(-1)


def lm_head_cross_entropy_sum(model, hidden: torch.Tensor, labels: torch.Tensor, memory: MemoryConfig | None = None,
                              *, ignore_index: int = IGNORE_INDEX, loss: LossConfig | None = None,
                              weights: torch.Tensor | None = None):
    """tiled_cross_entropy_sum with the lm_head and softcap of an HF causal LM and the tile settings of `memory`
    (MemoryConfig's defaults when None). `hidden` is the decoder's output after the final norm."""
    text_config = model.config.get_text_config()
    for name in ("logit_scale", "logits_scaling"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(text_config).__name__}.{name} rescales the logits, which the tiled loss does not do. "
                "Set MemoryConfig.tiled_loss=False for this model."
            )
    head = model.get_output_embeddings()
    memory = memory or MemoryConfig()
    return tiled_cross_entropy_sum(
        hidden, head.weight, labels, bias=head.bias, softcap=getattr(text_config, "final_logit_softcapping", None),
        ignore_index=ignore_index, tile_tokens=memory.tile_tokens, tile_memory_mib=memory.tile_memory_mib,
        loss=loss, weights=weights,
    )
