r"""Note [Exact router load-balancing loss]

Mixture-of-experts decoders (Qwen3-MoE, Mixtral, GPT-OSS) add `router_aux_loss_coef · aux` to the loss when
`config.output_router_logits` is set. transformers' `load_balancing_loss_func` (Switch Transformer, eqs. 4–6) pools
the router logits of every MoE layer and every token of the batch it is given (padding excluded by attention_mask):

    aux = E · Σ_e f_e · P_e,     f_e = C_e / N,     P_e = p_e / N
    C_e = number of top-k assignments to expert e,  p_e = Σ softmax(router logits)_e,  N = rows,

all three sums running over (layer, token) rows. (Up to transformers 5.x the formula has been written per layer
and concatenated, or accumulated layer by layer; both are this pooled statistic.) Its value is a product of two
sums, so a rank cannot compute its share locally: a rank's mean is not the whole sequence's mean. But C, p and N
are sums over tokens, so each rank sums over its own tokens (and tiles), one all-reduce of the (2E + 1) numbers
gives the totals, and the product is formed after:

    aux = E · Σ_e C_e · p_e / N²            (C, p, N all-reduced)

Over which ranks: all of them, sp and dp. The model computes aux over the batch it is given, and longseq's loss is
the loss of the model on the whole global batch (Note [Exact global loss]), so aux is the model's aux on the whole
global batch: the sp ranks' slices of each sequence and the dp ranks' rows, pooled. (HF's Trainer under DDP would
instead average the dp replicas' own auxes; the two differ by how unbalanced one replica's routing is versus the
global batch's, and the pooled one is what the model computes on the whole batch.) Padding rows that
`longseq.shard_batch` adds, and rows the user's attention_mask marks as padding, are left out, as transformers does
with an attention_mask; its `token_mask` says which rows count.

Gradient: C and N are counts (no gradient), so ∂aux = E · Σ_e C_e · ∂p_e / N², and p_e is a sum of each rank's own
rows. A rank's share is E · Σ_e C_e · p_e^rank / N², multiplied by the number of ranks W like the cross-entropy's
share, so that the usual gradient average over all ranks yields ∂aux exactly.

Gradient accumulation (`num_tokens`): the statistic of the whole window would need every micro-step's counts before
the first backward, which streaming micro-steps cannot have. Each micro-step's aux is the pooled one of its global
micro-batch, weighted by that micro-batch's share of the window's valid tokens (Σ of the weights = 1); with equal
micro-batches that is the mean of the micro-steps' auxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longseq.mesh import Mesh


@dataclass(kw_only=True, eq=False)
class RouterLoad:
    """The router statistics of one forward pass over this rank's tokens, summed over MoE layers and tiles."""

    num_experts: int
    """E: experts per MoE layer."""
    top_k: int
    """Experts each token is routed to (config.num_experts_per_tok)."""
    token_mask: torch.Tensor | None = None
    """(batch, local tokens) bool: rows that count (False: padding); None: all count."""
    probabilities: torch.Tensor | None = None
    """p: (E,) fp32 Σ of softmax(router logits) over counted rows; carries the gradient."""
    tally: torch.Tensor | None = None
    """(E + 1,) fp32: C, the top-k assignments per expert over counted rows, then N, the counted rows."""

    def add(self, probabilities: torch.Tensor, tally: torch.Tensor) -> None:
        """Add one MoE layer's (or tile's) statistics."""
        if self.probabilities is None:
            self.probabilities, self.tally = probabilities, tally
        else:
            self.probabilities, self.tally = self.probabilities + probabilities, self.tally + tally


class _RowSum(torch.autograd.Function):
    """Σ over rows of mask_n · x_n in fp32. The mask stays on ctx and is not saved: inside a checkpointed layer a saved
    tensor is recomputed in backward, when no mask may be at hand (Note [Exact router load-balancing loss])."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.mask, ctx.shape, ctx.dtype = mask, x.shape, x.dtype
        x = x.float()
        return (x * mask.unsqueeze(-1)).sum(0) if mask is not None else x.sum(0)

    @staticmethod
    def backward(ctx, grad):
        rows = grad.expand(ctx.shape)
        return (rows * ctx.mask.unsqueeze(-1) if ctx.mask is not None else rows).to(ctx.dtype), None


def router_statistics(logits: torch.Tensor, mask: torch.Tensor | None, top_k: int):
    """(p, tally) of one router call: logits (rows, E), mask (rows,) bool or None. Softmax and top-k in the logits'
    dtype, as transformers' load_balancing_loss_func computes them."""
    weights = torch.softmax(logits, dim=-1)
    selected = torch.topk(weights.detach(), top_k, dim=-1).indices
    counted = torch.ones(logits.shape[0], device=logits.device) if mask is None else mask.float()
    counts = torch.zeros(logits.shape[-1], device=logits.device)
    counts.index_add_(0, selected.flatten(), counted.repeat_interleave(top_k))
    tally = torch.cat([counts, counted.sum().view(1)])
    return _RowSum.apply(weights, None if mask is None else mask.float()), tally


def global_router_loss(load: RouterLoad, mesh: Mesh | None, count: torch.Tensor,
                       num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """aux over every rank's tokens (Note [Exact router load-balancing loss]): the value on every rank, the gradient
    this rank's share. `count`: this rank's valid-token count of the cross-entropy (weights aux by the micro-batch's
    share of `num_tokens` under gradient accumulation)."""
    if load.probabilities is None:
        raise RuntimeError("longseq: no MoE layer reported router statistics in this forward pass.")
    world = mesh.world_size if mesh is not None else 1
    totals = torch.cat([load.tally, load.probabilities.detach(), count.detach().float().view(1)])
    if world > 1:
        dist.all_reduce(totals)
    experts = load.num_experts
    counts, rows, probabilities = totals[:experts], totals[experts].clamp(min=1), totals[experts + 1:-1]
    scale = experts / rows**2
    if num_tokens is not None:
        scale = scale * totals[-1] / num_tokens.float().clamp(min=1)
    value = scale * (counts * probabilities).sum()
    share = world * scale * (counts * load.probabilities).sum()
    return share + (value - share).detach()
