r"""Note [Linear attention state passing]

In the style of LASP-2: the P ranks of a group hold runs of the sequence (one contiguous run per rank, or two per
ring rank in the zigzag layout of Note [Zigzag placement]). A Gated DeltaNet layer is a recurrence, so rank p
cannot know the state S_in its first token starts from until every earlier run is done. But each run, like each
token, is an affine map of the state (Note [Chunked gated delta rule], delta_rule.py): S_out = A·S_in + B. So:

    1. each rank scans its own runs from an unknown S_in, carrying the transition P from it: one pass gives every
       run's map (A, B) = (P_end, S⁰_end) and, per chunk, the start state as S⁰ + P·S_in;
    2. one all-gather of all runs' maps (per row and head: dk × (dk + dv) numbers, whatever the run length);
    3. every rank composes the maps in sequence order, S_in(first) = 0 and S_in(next) = A·S_in(prev) + B (a
       prefix of at most 2P tiny matmuls, done redundantly on every rank), and reads off its own runs' S_in;
    4. each chunk's outputs, O = R (S⁰ + P·S_in) + O₀, all at once.

         rank 0             rank 1             rank 2             rank 3
       [ run 0  ]         [ run 1  ]         [ run 2  ]         [ run 3  ]
        (A₀,B₀)            (A₁,B₁)            (A₂,B₂)            (A₃,B₃)       ← 1. local scans, no waiting
           └─────────────── all-gather of every (A, B) ─────────────┘         ← 2. one collective
        S_in = 0         S_in = B₀          S_in = A₁B₀ + B₁   S_in = A₂(A₁B₀+B₁) + B₂   ← 3. prefix combine
                                                                              ← 4. outputs, no waiting

A document that starts inside a run resets the state: the transition P is zero after it, so A = 0 and the run
passes on only its own last document's state (B). A run that starts a document ignores its S_in.

The backward follows from autograd: the all-gather's gradient is the sum over ranks of the gradients of every
rank's copy (an all-reduce), each rank keeping its own runs' part.

The depthwise causal convolution before the recurrence reads the kernel_size − 1 tokens before each token, so
each run needs a halo: the last kernel_size − 1 (pre-convolution) tokens of the run before it. Every rank sends the
tails of its runs in one all-gather and takes what its runs need (masked where a document starts in between).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    """x (...) on each rank → (P, ...) stacked in group order; backward: summed over ranks, own slice kept."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        # all_gather with a list: the form that gloo and NCCL both accept.
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad[dist.get_rank(ctx.group)]


def all_gather(group, x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x`, stacked in group order, with the gradient routed back to each rank's own."""
    return _AllGather.apply(group, x)


def incoming_states(group, transitions: torch.Tensor, updates: torch.Tensor, order: list[int],
                    mine: list[int]) -> torch.Tensor:
    """Steps 2-3 of Note [Linear attention state passing].

    transitions (B, H, R, dk, dk) and updates (B, H, R, dk, dv): this rank's runs' maps, R = the most runs any rank
    holds (padding entries unused). order: the runs in sequence order, as flat indices member·R + r into the
    gathered maps. mine: the same flat index of each of this rank's runs. Returns their S_in (B, H, len(mine), dk,
    dv), in the dtype of the maps.
    """
    gathered = all_gather(group, torch.cat([transitions, updates], dim=-1))  # (P, B, H, R, dk, dk + dv)
    gathered = gathered.movedim(0, 2).flatten(2, 3)  # (B, H, P·R, dk, dk + dv)
    dk = transitions.shape[-1]
    # The first run starts from zero. Taken from the gathered maps (times 0) so that the gathered tensor is in every
    # rank's graph: the all-gather's backward is a collective, and a rank whose runs read nothing gathered (the
    # holder of the first run) would otherwise skip it and leave the others waiting.
    state = gathered[:, :, order[0], :, dk:] * 0
    start_of = {}
    for position, flat in enumerate(order):
        if position:
            state = gathered[:, :, previous, :, :dk] @ state + gathered[:, :, previous, :, dk:]
        start_of[flat] = state
        previous = flat
    return torch.stack([start_of[flat] for flat in mine], dim=2)


def gather_halos(group, tails: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The halo of each of this rank's runs from every rank's run tails.

    tails (T, B, C): this rank's run tails (the same T on every rank); index (N,): flat indices into the gathered
    (P·T) tails of the halo tokens this rank needs; mask (N, B, 1): 0 where a halo token is not needed (before the
    sequence, or in an earlier document). Returns (N, B, C).
    """
    gathered = all_gather(group, tails).flatten(0, 1)
    return gathered.index_select(0, index) * mask.to(tails.dtype)
