"""Note [Zigzag placement]

With causal attention, the rank holding the end of the sequence does the most work. Split the sequence into
2·R chunks; ring rank r holds chunks r and 2R−1−r, so every rank owns one "early" and one "late" chunk:

    R = 2, chunks 0 1 2 3:      rank 0 → [0, 3]      rank 1 → [1, 2]

Each rank's portion is the concatenation of its two chunks. With a Ulysses degree U inside the ring, the portion is
cut into U contiguous pieces, one per Ulysses rank, so sp rank (r·U + u) holds piece u of portion r; the Ulysses
all-to-all reassembles the portion in order. With R = 1 the order is the identity.

Note [Document placement]

Attention work is the number of (query, key) pairs a rank computes: a token at offset o of its document sees o + 1
keys, so a document of length L costs L(L+1)/2, and a packed row is a sawtooth of such costs. Zigzag balances one
document (its cost grows linearly along the sequence, and chunk r pairs with chunk 2R−1−r), but not a sawtooth: rows
of documents drawn log-uniformly from 512 to 128K tokens, packed into 128K rows, give the busiest rank 1.26× the mean
work at R = 2, 1.46× at R = 4 and 1.58× at R = 8 (mean over 200 rows; up to 1.71×, 2.25×, 2.80×; per ring step it is
worse). Placed by the rule below: at most 1.002× (bench_packed.py --placement, bench/results/bench_packed.jsonl).

The rule for packed rows: zigzag every document. Document d of length L_d is cut into 2R chunks of c_d = ⌊L_d/2R⌋
tokens and ring rank r holds its chunks r and 2R−1−r, so every document is balanced on its own, in total and at
every ring step (at step s rank r meets the chunks of rank r−s of each document: the zigzag grid of one document). The
last e_d = L_d − 2R·c_d < 2R tokens of each document (the "tails") are concatenated in document order and cut into R
equal pieces, one per rank. A rank's portion is, in order:

    [chunk r of every document] [chunk 2R−1−r of every document] [its piece of the tails]

                  document A (L = 4c + 2)              document B (L = 4c' + 1)
        R = 2:    A0 A1 A2 A3 a a                      B0 B1 B2 B3 b
        rank 0 →  A0 B0 | A3 B3 | a           rank 1 →  A1 B1 | A2 B2 | a b

Bound: the zigzagged parts cost every rank exactly the same; only the tails differ, so the busiest rank exceeds the
mean by at most the tails' work, Σ_d e_d·L_d ≤ (2R−1)·S pairs, against ~Σ_d L_d²/2R per rank. A row of one document is plain zigzag. Keeping the early chunks, the late chunks and the tails each in
document order makes a ring step's blocks of all documents adjacent in both q and k, so they run as a few
variable-length kernel calls (Note [Variable-length blocks], varlen.py), however many documents a row holds.

The placement depends on the documents, so shard_batch (which sees the whole row) keeps zigzag and the loss path moves
tokens to this placement inside the model's forward (data/shard.py, place_documents): the model sees the same tokens,
positions and labels, only on other ranks; the loss is a sum over tokens, so it does not change.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

Chunk = tuple[int, int]
"""A contiguous range of the full row, (global start, length)."""
Layout = tuple[tuple[Chunk, ...], ...]
"""Per ring rank, its chunks in local order: the portion that rank holds."""


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


def zigzag_layout(length: int, ring: int) -> Layout:
    """Note [Zigzag placement] as a Layout: rank r holds chunks r and 2R−1−r of the row."""
    if ring == 1:
        return (((0, length),),)
    half = length // (2 * ring)
    return tuple(((r * half, half), ((2 * ring - 1 - r) * half, half)) for r in range(ring))


def document_layout(bounds: Sequence[int], ring: int) -> Layout:
    """Note [Document placement] for one row: `bounds` are its document starts and the row length at the end."""
    length = bounds[-1]
    if length % ring:
        raise ValueError(f"document_layout: a row of {length} tokens does not split into {ring} equal portions.")
    if ring == 1:
        return (((0, length),),)
    early, late, tails = [[] for _ in range(ring)], [[] for _ in range(ring)], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * ring)
        if chunk:
            for r in range(ring):
                early[r].append((start + r * chunk, chunk))
                late[r].append((start + (2 * ring - 1 - r) * chunk, chunk))
        if end > start + 2 * ring * chunk:
            tails.append((start + 2 * ring * chunk, end - start - 2 * ring * chunk))
    pieces = _cut(tails, sum(n for _, n in tails) // ring, ring)
    return tuple(tuple(early[r] + late[r] + pieces[r]) for r in range(ring))


def _cut(ranges: list[Chunk], size: int, count: int) -> list[list[Chunk]]:
    """Cut the concatenation of `ranges` into `count` pieces of `size` tokens (a range may be split in two)."""
    pieces: list[list[Chunk]] = [[] for _ in range(count)]
    piece, room = 0, size
    for start, length in ranges:
        while length:
            take = min(length, room)
            pieces[piece].append((start, take))
            start, length, room = start + take, length - take, room - take
            if not room and piece < count - 1:
                piece, room = piece + 1, size
    return pieces


def layout_order(layout: Layout, device=None) -> torch.Tensor:
    """The global token indices of every rank's portion, ranks one after another (cf. zigzag_order)."""
    return torch.cat([torch.arange(start, start + n, device=device) for portion in layout for start, n in portion])


def attention_work(bounds: Sequence[int], layout: Layout) -> list[int]:
    """Per ring rank, the (query, key) pairs its queries attend to: Note [Document placement]'s cost."""
    starts = list(bounds[:-1])
    work = []
    for portion in layout:
        total = 0
        for start, n in portion:
            total += _pairs(starts, start, start + n)
        work.append(total)
    return work


def _pairs(starts: list[int], lo: int, hi: int) -> int:
    """Σ over tokens t in [lo, hi) of (t − start of t's document + 1)."""
    total = 0
    i = bisect.bisect_right(starts, lo) - 1
    while lo < hi:
        doc_start = starts[i]
        end = min(hi, starts[i + 1]) if i + 1 < len(starts) else hi
        first, last = lo - doc_start + 1, end - doc_start
        total += (first + last) * (last - first + 1) // 2
        lo, i = end, i + 1
    return total
