"""Note [Ulysses all-to-all]

Each rank of a Ulysses group of size U holds s = S/U consecutive tokens and all heads. One all-to-all trades
"local tokens × all heads" for "all tokens × H/U heads", so the attention kernel sees the whole sequence and any
attention implementation (and document masking) works unchanged; a second all-to-all trades back:

    before:  rank u has tokens [u·s, (u+1)·s) of heads 0..H-1
    after:   rank u has tokens [0, S)         of heads [u·H/U, (u+1)·H/U)

q, k and v travel together in one collective, in the model's dtype. When there are fewer KV heads than ranks
(GQA/MQA), each KV head is replicated before the exchange so that every rank receives the KV heads its query heads
use (kv head j serves query heads j·g .. j·g+g−1, as in transformers' repeat_kv).

Each exchange writes its send buffer directly in rank-major order (U, B, heads or tokens for that rank, ...) and
reads the receive buffer through a permuted view: one copy in and one copy out (the first version made three). A
full-size copy of q, k and v is 12 KiB per token for Llama-3-8B, and such copies are alive at the memory peak.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longseq.parallel.local import expand_kv


def kv_replication(num_heads: int, num_kv_heads: int, degree: int) -> int:
    """How many times each KV head is copied so that `degree` ranks can split heads evenly (1 = no copy)."""
    if num_heads % degree:
        raise ValueError(
            f"Ulysses degree {degree} does not divide the {num_heads} attention heads. Use a degree that divides "
            f"{num_heads}, or move the rest into ring attention: longseq.init_mesh(sp=..., ring=...) "
            "(or pass model= to init_mesh to choose the split automatically)."
        )
    if num_kv_heads % degree == 0:
        return 1
    if degree % num_kv_heads:
        raise ValueError(
            f"Ulysses degree {degree} and the {num_kv_heads} key/value heads do not divide one another, so KV heads "
            "can be neither split nor replicated evenly. Use a Ulysses degree that divides or is a multiple of "
            f"{num_kv_heads}: longseq.init_mesh(sp=..., ring=...)."
        )
    return degree // num_kv_heads


def heads_to_sequence_split(group, q, k, v, replicate_kv: int):
    """(B, H, s, D) per rank → (B, H/U, S, D): gather the sequence, scatter the heads (q, k, v in one exchange)."""
    if replicate_kv > 1:
        k, v = expand_kv(k, replicate_kv), expand_kv(v, replicate_kv)
    if group is None or dist.get_world_size(group) == 1:
        return q, k, v
    return _HeadsToSequence.apply(group, q, k, v)


class _HeadsToSequence(torch.autograd.Function):
    """q, k, v (B, H, s, D) → contiguous (B, H/U, S, D) each; backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, group, q, k, v):
        world = dist.get_world_size(group)
        ctx.group, ctx.heads = group, [t.shape[1] // world for t in (q, k, v)]
        # send[u] = heads [u·h, (u+1)·h) of q, k and v for this rank's tokens
        send = torch.cat([t.unflatten(1, (world, -1)).transpose(0, 1) for t in (q, k, v)], dim=2)
        recv = _all_to_all_buffer(group, send)
        # recv[u] = rank u's tokens of this rank's heads; the sequence is the ranks' tokens in rank order
        return tuple(part.permute(1, 2, 0, 3, 4).flatten(2, 3) for part in recv.split(ctx.heads, dim=2))

    @staticmethod
    def backward(ctx, *grads):
        world = dist.get_world_size(ctx.group)
        # send[u] = the gradients of rank u's tokens, for this rank's heads
        send = torch.cat([g.unflatten(2, (world, -1)).permute(2, 0, 1, 3, 4) for g in grads], dim=2)
        recv = _all_to_all_buffer(ctx.group, send)
        # recv[u] = this rank's tokens for rank u's heads; heads are the ranks' heads in rank order
        return None, *(part.transpose(0, 1).flatten(1, 2) for part in recv.split(ctx.heads, dim=2))


def _all_to_all_buffer(group, send: torch.Tensor) -> torch.Tensor:
    """send (U, ...) contiguous: send[i] goes to rank i; returns recv with recv[i] from rank i."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def sequence_to_heads_split(group, out: torch.Tensor) -> torch.Tensor:
    """(B, S, H/U, D) → (B, s, H, D): scatter the sequence back, gather the heads."""
    if group is None or dist.get_world_size(group) == 1:
        return out
    return _SequenceToHeads.apply(group, out)


class _SequenceToHeads(torch.autograd.Function):
    """The attention output (B, S, H/U, D) → (B, s, H, D); backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, group, out):
        ctx.group = group
        world = dist.get_world_size(group)
        # send[u] = rank u's tokens of this rank's heads
        recv = _all_to_all_buffer(group, out.unflatten(1, (world, -1)).transpose(0, 1).contiguous())
        # recv[u] = this rank's tokens for rank u's heads
        return recv.permute(1, 2, 0, 3, 4).flatten(2, 3)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        recv = _all_to_all_buffer(ctx.group, grad.unflatten(2, (world, -1)).permute(2, 0, 1, 3, 4).contiguous())
        return None, recv.transpose(0, 1).flatten(1, 2)
