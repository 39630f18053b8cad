"""Note [Ulysses all-to-all]

Each rank of a Ulysses group of size U holds s = S/U consecutive tokens and all heads. One all-to-all trades
"local tokens × all heads" for "all tokens × H/U heads", so the attention kernel sees the whole sequence and any
attention implementation (and document masking) works unchanged; a second all-to-all trades back:

    before:  rank u has tokens [u·s, (u+1)·s) of heads 0..H-1
    after:   rank u has tokens [0, S)         of heads [u·H/U, (u+1)·H/U)

q, k and v travel together in one collective, in the model's dtype. When there are fewer KV heads than ranks
(GQA/MQA), each KV head is replicated before the exchange so that every rank receives the KV heads its query heads
use (kv head j serves query heads j·g .. j·g+g−1, as in transformers' repeat_kv).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longseq.parallel.local import expand_kv


def _exchange(group, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into U pieces along scatter_dim, send piece i to rank i, join what arrives along gather_dim."""
    world = dist.get_world_size(group)
    send = torch.stack(x.tensor_split(world, dim=scatter_dim))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] came from rank i; rank order is the order along gather_dim.
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the inverse all-to-all (exact: it only moves data)."""

    @staticmethod
    def forward(ctx, group, x, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(group, x, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return None, _exchange(ctx.group, grad, ctx.gather_dim, ctx.scatter_dim), None, None


def all_to_all(group, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(group, x, scatter_dim, gather_dim)


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
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return q, k, v
    heads = [q.shape[1] // world, k.shape[1] // world, v.shape[1] // world]
    # Interleave per destination rank so one all-to-all moves all three: [q_u, k_u, v_u] for u in ranks.
    packed = torch.cat(
        [t.unflatten(1, (world, -1)) for t in (q, k, v)], dim=2
    ).flatten(1, 2)
    packed = all_to_all(group, packed, scatter_dim=1, gather_dim=2)
    return packed.split(heads, dim=1)


def sequence_to_heads_split(group, out: torch.Tensor) -> torch.Tensor:
    """(B, S, H/U, D) → (B, s, H, D): scatter the sequence back, gather the heads."""
    return all_to_all(group, out, scatter_dim=1, gather_dim=2)
