r"""Note [Linear attention under sequence parallelism]

A Gated DeltaNet layer (Qwen3-Next, Qwen3.5, OLMo-Hybrid) is: token-wise projections → q, k, v channels, gates
a, b and an output gate z; a depthwise causal convolution (kernel_size 4) over the q, k, v channels; the gated delta
rule per value head (Note [Chunked gated delta rule]); a gated norm and the output projection, token-wise again.
Only the convolution and the recurrence mix tokens, and both are per channel / per head. Two ways to run them exactly
over ranks that each hold a slice of the sequence:

heads (Ulysses): one all-to-all over the Ulysses group trades "my tokens × all heads" for "all tokens × my heads"
    (q, k, v channels before the convolution and the raw gates a, b of those heads travel together), the
    convolution (with the weights of those channels) and the recurrence run over whole sequences, unchanged, and one
    all-to-all brings the outputs back. Each rank takes Hv/U value heads and the key heads they read; where U does
    not divide the key heads, key heads are copied (as GQA does with KV heads), which needs the copies per key head
    to divide the value heads per key head. With a ring (ring > 1), the sequence after the exchange is the ring
    rank's portion (two chunks, Note [Zigzag placement]), and the ring group passes state as below.

state (LASP-2): no all-to-all; each rank keeps all heads of its tokens, the ranks of the sp group exchange
    convolution halos and recurrent states (Note [Linear attention state passing]). Per token the heads mode moves
    the layer's whole q, k, v width twice; state passing moves per rank only dk × (dk + dv) numbers per head and
    kernel_size − 1 tokens, whatever the length, but computes the transition P alongside the state.

"auto" picks heads where the Ulysses degree splits the heads, state otherwise. Packed documents (read from
position_ids, like the attention's) restart the convolution and the state; so does the start of the sequence.

    heads, sp = 2 (R = 1)                             state, sp = 2
    rank 0: tokens 0..s  × heads 0..H ─┐            rank 0: tokens 0..s  × all heads ──(A₀, B₀)──┐
    rank 1: tokens s..2s × heads 0..H ─┤ all-to-all  rank 1: tokens s..2s × all heads  ←─ halo, S_in ┘
    rank 0: tokens 0..2s × heads 0..H/2, rank 1: heads H/2..H
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq.mesh import Mesh
from longseq.parallel.balance import zigzag_order
from longseq.parallel.causal_conv import ConvPlan, causal_conv, conv_plan
from longseq.parallel.delta_rule import (
    ChunkLayout, Segment, block_outputs, block_run_maps, chunk_layout, chunked, from_chunks, gated_delta_rule,
    in_blocks,
)
from longseq.parallel.state_passing import gather_halos, incoming_states

MODES = ("auto", "heads", "state")


@dataclass(frozen=True, kw_only=True)
class LinearSharding:
    """How a model's linear-attention layers are spread over the sp ranks (the same for all its layers)."""

    heads_group: dist.ProcessGroup | None = None
    """The Ulysses group whose all-to-all gives each rank whole sequences of some heads; None: no exchange."""
    heads_degree: int = 1
    key_copies: int = 1
    """How many copies of each key head are made so that the key heads split evenly over heads_degree ranks."""
    state_group: dist.ProcessGroup | None = None
    """The group that passes convolution halos and recurrent states; None: every rank holds whole sequences."""
    members: int = 1
    member: int = 0
    ring: int = 1
    """The ring degree that shard_batch used (the zigzag layout of the sequence)."""


def head_split(num_k_heads: int, num_v_heads: int, degree: int) -> int | None:
    """Copies of each key head for splitting the heads over `degree` ranks; None if they cannot be split."""
    if num_v_heads % degree or num_v_heads % num_k_heads:
        return None
    copies = degree // math.gcd(num_k_heads, degree)
    return copies if (num_v_heads // num_k_heads) % copies == 0 else None


def linear_sharding(mesh: Mesh, mode: str, num_k_heads: int, num_v_heads: int) -> LinearSharding:
    """Note [Linear attention under sequence parallelism]: the layout for `mode` ('auto', 'heads' or 'state')."""
    if mode not in MODES:
        raise ValueError(f"linear_attention={mode!r} is not one of {MODES}.")
    copies = head_split(num_k_heads, num_v_heads, mesh.ulysses)
    if mode == "heads" and copies is None:
        raise ValueError(
            f"linear_attention='heads' cannot split {num_v_heads} value heads and {num_k_heads} key heads over the "
            f"Ulysses degree {mesh.ulysses}: it must divide the value heads, and the key-head copies it needs "
            f"({mesh.ulysses // math.gcd(num_k_heads, mesh.ulysses)}) must divide the value heads per key head. Use "
            "linear_attention='state' (or 'auto'), or a Ulysses degree that splits the heads (init_mesh(ring=...))."
        )
    if mode == "state" or copies is None:
        if mesh.sp == 1:
            return LinearSharding()
        return LinearSharding(state_group=mesh.sp_group, members=mesh.sp, member=mesh.sp_rank, ring=mesh.ring)
    heads = dict(heads_group=mesh.ulysses_group, heads_degree=mesh.ulysses, key_copies=copies) if mesh.ulysses > 1 \
        else {}
    if mesh.ring == 1:
        return LinearSharding(**heads)
    return LinearSharding(**heads, state_group=mesh.ring_group, members=mesh.ring, member=mesh.ring_rank,
                          ring=mesh.ring)


@dataclass(frozen=True)
class Run:
    """Consecutive tokens of the sequence that one rank holds together."""

    offset: int  # where they start among the rank's tokens
    start: int  # where they start in the sequence
    length: int


@functools.lru_cache(maxsize=16)
def member_runs(length: int, ring: int, members: int) -> tuple[tuple[Run, ...], ...]:
    """Each member's runs, in its local order, when member i holds slice i of the zigzag-ordered sequence."""
    order = zigzag_order(length, ring)
    per = length // members
    result = []
    for i in range(members):
        positions = order[i * per:(i + 1) * per]
        cuts = [0] + (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist() + [per]
        result.append(tuple(Run(a, int(positions[a]), b - a) for a, b in zip(cuts[:-1], cuts[1:])))
    return tuple(result)


@dataclass(frozen=True, kw_only=True)
class LinearPlan:
    """Everything one forward pass's layers share: where tokens go for the convolution and the recurrence, and which
    halo tokens and states this rank takes (state passing only)."""

    conv: ConvPlan
    chunks: ChunkLayout
    tails: torch.Tensor | None = None
    """(runs_max · (kernel − 1),) local token index of each of this rank's run tails (the halos others need)."""
    halo_index: torch.Tensor | None = None
    halo_mask: torch.Tensor | None = None
    order: list[int] | None = None
    mine: list[int] | None = None
    runs_max: int = 1


def linear_plan(boundaries: list[list[int]], sharding: LinearSharding, local_length: int, kernel: int,
                device, block_chunks: int | None = None) -> LinearPlan:
    """The plan for rows whose documents start at `boundaries` (global offsets, as parallel/documents.py gives); the
    recurrence in blocks of `block_chunks` chunks (None: delta_rule.BLOCK_CHUNKS)."""
    runs = member_runs(local_length * sharding.members, sharding.ring, sharding.members)
    mine = runs[sharding.member]
    segments, run_ends, conv_rows = [], [], []
    for row in boundaries:
        row_segments, ends, conv_runs = _row_layout(mine, row)
        segments.append(row_segments)
        run_ends.append(ends)
        conv_rows.append(conv_runs)
    linking = sharding.members > 1
    conv = conv_plan(conv_rows, local_length, kernel, device)
    chunks = chunk_layout(segments, local_length, run_ends if linking else None, device, block_chunks=block_chunks)
    if not linking:
        return LinearPlan(conv=conv, chunks=chunks)
    runs_max = max(len(r) for r in runs)
    ordered = sorted((run.start, i * runs_max + j) for i, member in enumerate(runs) for j, run in enumerate(member))
    return LinearPlan(conv=conv, chunks=chunks, runs_max=runs_max, order=[flat for _, flat in ordered],
                      mine=[sharding.member * runs_max + j for j in range(len(mine))],
                      **_halos(runs, mine, boundaries, runs_max, kernel, device))


def _row_layout(mine, row: list[int]):
    """One row's segments (cut at document starts), the segment that ends each run, and the convolution's runs."""
    starts = set(row[:-1])
    segments, ends, conv_runs = [], [], []
    for j, run in enumerate(mine):
        inner = [d - run.start for d in row[1:-1] if run.start < d < run.start + run.length]
        continues = run.start > 0 and run.start not in starts
        cuts = [0] + inner + [run.length]
        for piece, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            segments.append(Segment(start=run.offset + a, length=b - a, linked=continues and piece == 0, run=j))
        ends.append(len(segments) - 1)
        conv_runs.append((run.offset, run.length, inner))
    return segments, ends, conv_runs


def _halos(runs, mine, boundaries, runs_max: int, kernel: int, device) -> dict:
    """Which gathered tail token each halo slot of this rank's runs reads, and whether it is of the same document."""
    width = kernel - 1
    tails = [min(max(run.offset + run.length - width + t, run.offset), run.offset + run.length - 1)
             for run in mine for t in range(width)]
    tails += [0] * (runs_max * width - len(tails))
    by_start = sorted((run.start, i, j, run) for i, member in enumerate(runs) for j, run in enumerate(member))
    starts = [s for s, *_ in by_start]
    index, mask = [], []
    for run in mine:
        for position in range(run.start - width, run.start):
            if position < 0:
                index.append(0)
            else:
                _, i, j, holder = by_start[bisect.bisect_right(starts, position) - 1]
                index.append((i * runs_max + j) * width + position - (holder.start + holder.length - width))
            mask.append([float(position >= 0 and _same_document(row, position, run.start)) for row in boundaries])
    return dict(tails=torch.tensor(tails, dtype=torch.long, device=device),
                halo_index=torch.tensor(index, dtype=torch.long, device=device),
                halo_mask=torch.tensor(mask, device=device).view(len(index), len(boundaries), 1))


def _same_document(row: list[int], first: int, second: int) -> bool:
    return bisect.bisect_right(row, first) == bisect.bisect_right(row, second)


@dataclass(frozen=True, kw_only=True)
class GatedDeltaNetWeights:
    """What the token-mixing part of a Gated DeltaNet layer reads, in transformers' layout."""

    num_k_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_weight: torch.Tensor
    """(channels, kernel): channels are the q, then k, then v channels, head by head."""
    conv_bias: torch.Tensor | None
    activation: str | None
    A_log: torch.Tensor  # noqa: N815 (the models' name)
    dt_bias: torch.Tensor
    beta_scale: float = 1.0
    """2.0 where the model allows negative eigenvalues (OLMo-Hybrid's linear_allow_neg_eigval)."""


def gated_delta_mix(sharding: LinearSharding, plan: LinearPlan, q, k, v, b, a,
                    weights: GatedDeltaNetWeights) -> torch.Tensor:
    """Note [Linear attention under sequence parallelism]. q, k (B, s, Hk, dk), v (B, s, Hv, dv) before the
    convolution, b, a (B, s, Hv) raw gates, for this rank's tokens; returns the recurrence's output (B, s, Hv, dv)."""
    degree = sharding.heads_degree
    k_heads = torch.arange(q.shape[2], device=q.device)
    v_heads = torch.arange(v.shape[2], device=q.device)
    if degree > 1:
        q, k, v, b, a = _exchange_heads(sharding, q, k, v, b, a)
        rank = dist.get_rank(sharding.heads_group)
        k_heads = (rank * q.shape[2] + torch.arange(q.shape[2], device=q.device)) // sharding.key_copies
        v_heads = rank * v.shape[2] + torch.arange(v.shape[2], device=q.device)
    q, k, v = _convolve(sharding, plan, q, k, v, k_heads, v_heads, weights)
    beta = b.sigmoid()
    if weights.beta_scale != 1.0:
        beta = beta * weights.beta_scale
    g = -weights.A_log[v_heads].float().exp() * F.softplus(a.float() + weights.dt_bias[v_heads])
    if sharding.state_group is None:
        out = gated_delta_rule(q, k, v, g, beta, plan.chunks)
    else:
        out = _passed_delta_rule(sharding, plan, q, k, v, g, beta)
    if degree > 1:
        out = _ScatterSequence.apply(sharding.heads_group, out.flatten(2)).flatten(2, 3).unflatten(2, (-1, v.shape[-1]))
    return out


def _convolve(sharding, plan, q, k, v, k_heads, v_heads, weights: GatedDeltaNetWeights):
    """The depthwise causal convolution over this rank's channels (with halos when passing state), then q, k, v."""
    dk, dv = weights.head_k_dim, weights.head_v_dim
    key_dim = weights.num_k_heads * dk
    channels = torch.cat([(k_heads[:, None] * dk + torch.arange(dk, device=q.device)).flatten(),
                          key_dim + (k_heads[:, None] * dk + torch.arange(dk, device=q.device)).flatten(),
                          2 * key_dim + (v_heads[:, None] * dv + torch.arange(dv, device=q.device)).flatten()])
    x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
    halo = None
    if sharding.state_group is not None:
        tails = x[:, plan.tails].transpose(0, 1)
        halo = gather_halos(sharding.state_group, tails, plan.halo_index, plan.halo_mask).transpose(0, 1)
    bias = weights.conv_bias[channels] if weights.conv_bias is not None else None
    x = causal_conv(x, halo, weights.conv_weight[channels], bias, weights.activation, plan.conv)
    q, k, v = x.split([q.shape[2] * dk, k.shape[2] * dk, v.shape[2] * dv], dim=-1)
    return q.unflatten(-1, (-1, dk)), k.unflatten(-1, (-1, dk)), v.unflatten(-1, (-1, dv))


def _passed_delta_rule(sharding, plan, q, k, v, g, beta) -> torch.Tensor:
    """The recurrence with states passed between the ranks (Note [Linear attention state passing])."""
    blocks = in_blocks(chunked(q, k, v, g, beta, plan.chunks), plan.chunks.block_chunks)
    run_maps = block_run_maps(blocks, plan.chunks)
    transitions, updates = (F.pad(m, (0, 0, 0, 0, 0, plan.runs_max - m.shape[2])) for m in run_maps)
    incoming = incoming_states(sharding.state_group, transitions, updates, plan.order, plan.mine)
    return from_chunks(block_outputs(blocks, plan.chunks, incoming), plan.chunks, q.shape[1])


def _exchange_heads(sharding, q, k, v, b, a):
    """All-to-all: this rank's tokens of all heads → all tokens of this rank's heads (key heads copied first)."""
    degree, copies = sharding.heads_degree, sharding.key_copies
    if copies > 1:
        q, k = q.repeat_interleave(copies, dim=2), k.repeat_interleave(copies, dim=2)
    parts = [q, k, v, b.unsqueeze(-1), a.unsqueeze(-1)]
    send = torch.cat([t.unflatten(2, (degree, -1)).flatten(3) for t in parts], dim=-1)  # (B, s, U, W)
    received = _GatherSequence.apply(sharding.heads_group, send)  # (B, S, W)
    widths = [t.shape[2] // degree * t.shape[3] for t in parts]
    q, k, v, b, a = received.split(widths, dim=-1)
    return (q.unflatten(-1, (-1, parts[0].shape[-1])), k.unflatten(-1, (-1, parts[1].shape[-1])),
            v.unflatten(-1, (-1, parts[2].shape[-1])), b, a)


def _all_to_all(group, send: torch.Tensor) -> torch.Tensor:
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return received


def _to_sequence(group, x: torch.Tensor) -> torch.Tensor:
    """(B, s, U, W), part u for rank u → (B, U·s, W): every rank's tokens of this rank's part, in rank order."""
    received = _all_to_all(group, x.permute(2, 0, 1, 3).contiguous())
    return received.permute(1, 0, 2, 3).flatten(1, 2)


def _to_tokens(group, x: torch.Tensor) -> torch.Tensor:
    """The inverse of _to_sequence: (B, U·s, W) → (B, s, U, W)."""
    degree = dist.get_world_size(group)
    received = _all_to_all(group, x.unflatten(1, (degree, -1)).permute(1, 0, 2, 3).contiguous())
    return received.permute(1, 2, 0, 3)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        return _to_sequence(group, x)

    @staticmethod
    def backward(ctx, grad):
        return None, _to_tokens(ctx.group, grad)


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        return _to_tokens(group, x)

    @staticmethod
    def backward(ctx, grad):
        return None, _to_sequence(ctx.group, grad)
