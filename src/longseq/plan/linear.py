"""Gated DeltaNet layers in the memory and time model (parallel/linear_attention.py, parallel/delta_rule.py).

Note [Linear attention in the plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A Gated DeltaNet layer keeps no attention output and no log-sum-exp; its mixer (the convolution over q, k, v, the
gates, the chunked delta rule) keeps per token the convolution's input and output and q, k, v, g, β in chunk
layout, and works through the chunks a block at a time (Note [Chunked gated delta rule], Blocks): a block's
C-wide rows of the decay, system and score matrices (C = 64), fp32 copies of q, k, v and their products, and per
chunk the dk × dk transitions and dk × dv states are alive only while the block runs, in the forward and again in
its backward. Rather than restate that code term by term, the plan measures it: longseq's own mixer
(gated_delta_mix) runs forward and backward on CPU for one key head and its value heads, at the layer's head
dimensions and kernel, and the live tensors (plan/live_bytes.py) give, per token and value head, the bytes it keeps
after its forward, at the peak of its forward (in a checkpoint's recompute, beside the in-projections' outputs) and
at the peak of its backward, from blocks of one chunk at two and four chunks; and what one block holds at those
peaks, per token and value head of the block, from blocks of four chunks against blocks of one at four chunks. A
block is BLOCK_CHUNKS chunks of every row, of the value heads a rank runs (heads mode: Hv/U heads over the rank's
ring portion of the sequence; state passing, where the Ulysses degree cannot split the heads: every head over the
rank's tokens), so per token of a rank it is a fixed term once a row is longer than a block. The all-to-all
buffers of heads mode and the transitions of state passing (dk × dk per chunk more) at sp > 1 are not counted.

Around the mixer the layer keeps its normed input (the in-projections read it; they are not fused with the norm),
and until their backward, which comes before the mixer's, the gated norm's fp32 copies of the output and gate, its
outputs, and the out-projection's input; at the mixer's backward the gradient of the output gate z is held.

Time: the chunked rule's FLOPs (per token and value head, with C = 64: 3C·dk + C·dv + C(dk + dv)/2 + dk² + 2dk·dv +
dk²·dv/C multiply-adds forward, three times that for forward and backward) at the card's delta_rule_tflops; the
projections at its GEMM speed.
"""

from __future__ import annotations

import functools

from longseq.parallel.sizes import BLOCK_CHUNKS, CHUNK_TOKENS
from longseq.plan.terms import Term


@functools.lru_cache(maxsize=16)
def mixer_bytes(k_dim: int, v_dim: int, groups: int, kernel: int, dtype_bytes: int) -> tuple[float, float, float]:
    """(kept after its forward, peak in its forward, peak in its backward) bytes per token and value head of
    longseq's Gated DeltaNet mixer beside one block, measured on CPU (Note [Linear attention in the plan]);
    `groups` value heads per key head."""
    sizes = [_measure(k_dim, v_dim, groups, kernel, dtype_bytes, chunks, block_chunks=1) for chunks in (2, 4)]
    tokens = 2 * CHUNK_TOKENS
    return tuple((large - small) / tokens / groups for small, large in zip(*sizes))


@functools.lru_cache(maxsize=16)
def block_bytes(k_dim: int, v_dim: int, groups: int, kernel: int, dtype_bytes: int) -> tuple[float, float]:
    """(at the peak of its forward, at the peak of its backward) bytes per token and value head of one block of the
    mixer's chunks, measured on CPU (Note [Linear attention in the plan])."""
    small, large = (_measure(k_dim, v_dim, groups, kernel, dtype_bytes, 4, block_chunks=size) for size in (1, 4))
    tokens = 3 * CHUNK_TOKENS
    return (large[1] - small[1]) / tokens / groups, (large[2] - small[2]) / tokens / groups


def _measure(k_dim: int, v_dim: int, groups: int, kernel: int, dtype_bytes: int, chunks: int,
             block_chunks: int) -> tuple[int, ...]:
    import torch

    from longseq.parallel.linear_attention import GatedDeltaNetWeights, LinearSharding, gated_delta_mix, linear_plan
    from longseq.plan.live_bytes import LiveBytes

    dtype, n = (torch.bfloat16 if dtype_bytes == 2 else torch.float32), chunks * CHUNK_TOKENS
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    q, k, v, b, a = leaf(1, n, 1, k_dim), leaf(1, n, 1, k_dim), leaf(1, n, groups, v_dim), leaf(1, n, groups), \
        leaf(1, n, groups)
    weights = GatedDeltaNetWeights(num_k_heads=1, head_k_dim=k_dim, head_v_dim=v_dim,
                                   conv_weight=leaf(2 * k_dim + groups * v_dim, kernel), conv_bias=None,
                                   activation="silu", A_log=leaf(groups), dt_bias=leaf(groups))
    sharding = LinearSharding()
    plan = linear_plan([[0, n]], sharding, n, kernel, "cpu", block_chunks=block_chunks)
    with LiveBytes() as live:
        out = gated_delta_mix(sharding, plan, q, k, v, b, a, weights)
        kept, forward = live.alive(), live.peak
        live.reset_peak()
        out.backward(torch.ones_like(out))
    # In a layer the output is the gated norm's input (its own term), freed before the mixer's backward; its
    # gradient is not, and is counted here.
    size = out.untyped_storage().nbytes()
    return kept - size, forward, live.peak - size


def _mixer(problem) -> tuple[float, float, float]:
    linear = problem.shape.linear
    per_head = mixer_bytes(linear.k_dim, linear.v_dim, linear.v_heads // linear.k_heads, linear.kernel,
                           problem.dtype_bytes)
    return tuple(bytes_ * linear.v_heads for bytes_ in per_head)


def _block(problem) -> tuple[float, float]:
    """Bytes of one block of the rule on a rank, at the mixer's forward and backward peaks."""
    from longseq.parallel.linear_attention import head_split

    linear, layout, rows = problem.shape.linear, problem.layout, problem.workload.batch
    if head_split(linear.k_heads, linear.v_heads, layout.ulysses) is not None:  # heads mode, as 'auto' chooses
        heads, row_tokens = linear.v_heads // layout.ulysses, problem.tokens * layout.ulysses / rows
    else:
        heads, row_tokens = linear.v_heads, problem.tokens / rows
    token_heads = rows * heads * min(row_tokens, BLOCK_CHUNKS * CHUNK_TOKENS)
    per_head = block_bytes(linear.k_dim, linear.v_dim, linear.v_heads // linear.k_heads, linear.kernel,
                           problem.dtype_bytes)
    return tuple(bytes_ * token_heads for bytes_ in per_head)


def saved(problem, group: str) -> tuple[list[Term], list[Term]]:
    """What a Gated DeltaNet layer's mixer part keeps: (alive through the mixer's backward, freed before it)."""
    linear, e = problem.shape.linear, problem.dtype_bytes
    kept = _mixer(problem)[0]
    through = [Term("normed input (the in-projections' input)", group, problem.shape.hidden * e),
               Term("Gated DeltaNet mixer: convolution, gates, chunked delta rule (measured)", group, kept)]
    before = [Term("gated norm: fp32 copies of output and gate, its outputs; out-projection input", group,
                   linear.value_width * (3 * 4 + 2 * e) + linear.v_heads * 4)]
    return through, before


def backward(problem) -> list[Term]:
    """The mixer's backward at its peak, beyond what it keeps; the output gate's gradient beside it."""
    linear = problem.shape.linear
    kept, _, peak = _mixer(problem)
    g = "linear attention backward"
    return [Term("Gated DeltaNet mixer backward (measured, beyond what it keeps)", g, peak - kept),
            Term("Gated DeltaNet mixer backward: one block (measured)", g, fixed=_block(problem)[1]),
            Term("gradient of the output gate z (fp32)", g, linear.value_width * 4)]


def recompute(problem) -> list[Term]:
    """The mixer's forward at its peak (in a checkpoint's recompute), beside the in-projections' outputs."""
    linear, g = problem.shape.linear, "linear attention forward (recomputed)"
    width = linear.conv_width + linear.value_width + 2 * linear.v_heads
    if linear.interleaved:  # v and z copied out of Qwen3-Next's interleaved projection
        width += 2 * linear.value_width
    return [Term("in-projections' outputs (q, k, v, z, b, a; copies of v and z)", g, width * problem.dtype_bytes),
            Term("Gated DeltaNet mixer forward (measured, at its peak)", g, _mixer(problem)[1]),
            Term("Gated DeltaNet mixer forward: one block (measured)", g, fixed=_block(problem)[0])]


def core_flops(problem) -> float:
    """Forward FLOPs of the chunked delta rule on the rank's tokens (every token × every value head: under Ulysses
    a rank holds all tokens of 1/U of the heads, the same count)."""
    linear, c = problem.shape.linear, CHUNK_TOKENS
    dk, dv = linear.k_dim, linear.v_dim
    macs = 3 * c * dk + c * dv + c * (dk + dv) / 2 + dk * dk + 2 * dk * dv + dk * dk * dv / c
    return 2.0 * macs * linear.v_heads * problem.tokens


def projection_flops(problem) -> float:
    """Forward FLOPs of the layer's token-wise projections (in: q, k, v, z, b, a; out) and its convolution."""
    linear, h = problem.shape.linear, problem.shape.hidden
    width = linear.conv_width + linear.value_width + 2 * linear.v_heads
    return 2.0 * problem.tokens * (h * width + linear.value_width * h + linear.conv_width * linear.kernel)
