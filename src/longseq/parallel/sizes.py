"""How big the pieces are that the kernels cut their work into: plain integers, read by the kernels and by the
planner (plan/), which runs without importing torch.

    CHUNK_TOKENS, BLOCK_CHUNKS    the gated delta rule's chunks and blocks (Note [Chunked gated delta rule])
    BAND_SCORES, band_rows        a sliding-window band's chunks of query rows (Note [Sliding windows on blocks])
    allowed_sizes, group_size,    query heads per call of the block kernels (Note [Attention head groups])
    heads_within
"""

from __future__ import annotations

MIB = 1 << 20

CHUNK_TOKENS = 64
"""Tokens per chunk (transformers' reference and flash-linear-attention use 64 as well)."""

BLOCK_CHUNKS = 32
"""Chunks per block (Note [Chunked gated delta rule], Blocks): one block's maps and their graph, ~13 KiB per token and
value head, are ~0.8 GiB for a row of Qwen3-Next's 32 value heads."""

BAND_SCORES = 1 << 24
"""Scores per chunk of a band (64 MiB in fp32); a few tensors of this size live at once."""


def band_rows(batch: int, heads: int, nq: int, nk: int, window: int) -> int:
    """Query rows per chunk of a band of nq queries and nk keys (Note [Sliding windows on blocks]). A chunk of r rows
    reaches r + w − 1 keys, so r stays at most w: its scores stay within BAND_SCORES and grow with the window, not
    with the sequence."""
    return max(1, min(nq, window, BAND_SCORES // (batch * heads * 2 * min(window, max(nk, 1)))))


def allowed_sizes(heads: int, kv_heads: int) -> list[int]:
    """Query heads a call may take: divisors of g = heads / kv_heads, and g · m for m dividing kv_heads."""
    group = heads // kv_heads
    return sorted({h for h in range(1, group + 1) if group % h == 0}
                  | {group * m for m in range(1, kv_heads + 1) if kv_heads % m == 0})


def group_size(heads: int, kv_heads: int, want: int) -> int:
    """The largest allowed number of query heads per call that is at most `want` (one at least)."""
    return max(h for h in allowed_sizes(heads, kv_heads) if h <= max(1, want))


def heads_within(memory_mib: int, batch: int, heads: int, kv_heads: int, length: int, head_dim: int,
                 itemsize: int) -> int:
    """Query heads per call whose backward buffers fit memory_mib: per query head about
    B · L · D · (5 · itemsize + 4) bytes (dq, dk, dv, expanded k and v in the input dtype, the fp32 accumulator;
    Note [Attention head groups])."""
    per_head = batch * length * head_dim * (5 * itemsize + 4)
    return group_size(heads, kv_heads, memory_mib * MIB // max(1, per_head))
