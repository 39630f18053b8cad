"""Note [Zigzag placement]

With causal attention, the rank holding the end of the sequence does the most work. Split the sequence into
2·R chunks; ring rank r holds chunks r and 2R−1−r, so every rank owns one "early" and one "late" chunk:

    R = 2, chunks 0 1 2 3:      rank 0 → [0, 3]      rank 1 → [1, 2]

Each rank's portion is the concatenation of its two chunks. With a Ulysses degree U inside the ring, the portion is
cut into U contiguous pieces, one per Ulysses rank, so sp rank (r·U + u) holds piece u of portion r; the Ulysses
all-to-all reassembles the portion in order. With R = 1 the order is the identity.
"""

from __future__ import annotations

import torch


def zigzag_order(length: int, ring: int, device=None) -> torch.Tensor:
    """Permutation p such that x[..., p] lists the ring ranks' portions one after another."""
    if ring == 1:
        return torch.arange(length, device=device)
    if length % (2 * ring):
        raise ValueError(f"zigzag_order: length {length} must be divisible by 2·ring = {2 * ring}.")
    chunks = torch.arange(length, device=device).view(2 * ring, length // (2 * ring))
    return torch.cat([torch.cat([chunks[r], chunks[2 * ring - 1 - r]]) for r in range(ring)])


def portion_positions(length: int, ring: int, ring_rank: int) -> torch.Tensor:
    """Global token indices of ring rank `ring_rank`'s portion, in local order."""
    per_rank = length // ring
    return zigzag_order(length, ring)[ring_rank * per_rank:(ring_rank + 1) * per_rank]


def natural_order(permuted: torch.Tensor, ring: int) -> torch.Tensor:
    """Undo zigzag_order along dim 1: the sp ranks' slices, concatenated in rank order, back in token order."""
    if ring == 1:
        return permuted
    natural = torch.empty_like(permuted)
    natural[:, zigzag_order(permuted.shape[1], ring, device=permuted.device)] = permuted
    return natural
