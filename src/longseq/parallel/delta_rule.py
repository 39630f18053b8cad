r"""Note [Chunked gated delta rule]

The gated delta rule (Gated DeltaNet; transformers' Qwen3-Next, Qwen3.5, OLMo-Hybrid) keeps per head a state
S (dk × dv). Token t, with key k_t (unit length), value v_t, query q_t (unit length, scaled by dk^-½), decay g_t ≤ 0
and write strength β_t, does

    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ          o_t = S_tᵀ q_t

so each token is an affine map of the state, S ↦ M_t S + N_t, and so is any run of tokens: the maps compose as
(A₂, B₂) ∘ (A₁, B₁) = (A₂A₁, A₂B₁ + B₂). Chunks of C = 64 tokens get their map in closed form. Inside a chunk with
γ_i = g_1 + … + g_i, the state after token i is S_i = e^{γ_i} S_0 + Σ_{j≤i} e^{γ_i−γ_j} k_j u_jᵀ for "new values"
u_j, and putting that into the recurrence gives a unit lower-triangular system (UT transform):

    (I + L) U = Vβ − (Kβ ⊙ e^γ) S_0,     L_ij = β_i e^{γ_i−γ_j} k_iᵀk_j  (j < i)
    U = U₀ − W S_0  with  U₀ = (I+L)⁻¹ Vβ,  W = (I+L)⁻¹ (Kβ ⊙ e^γ)

and with D_ij = e^{γ_i−γ_j} (j ≤ i, else 0) and K̃ = K ⊙ e^{γ_C−γ}, everything is linear in S_0:

    outputs   O   = R S_0 + O₀        R = Q ⊙ e^γ − (QKᵀ ⊙ D) W     O₀ = (QKᵀ ⊙ D) U₀          (C × dk, C × dv)
    end state S_C = A S_0 + B          A = e^{γ_C} I − K̃ᵀ W           B = K̃ᵀ U₀                  (dk × dk, dk × dv)

All chunks' (A, B, R, O₀) are computed at once (batched matmuls and one triangular solve); what remains sequential
is the scan S_c = A_c S_{c−1} + B_c over chunks, dk²·dv per chunk (the same work as the usual form
S_C = e^{γ_C}S_0 + K̃ᵀ(U₀ − W S_0)), and then every chunk's outputs again at once.

Packed documents. Every segment (a document's tokens in one row) starts on a chunk boundary: the chunk layout pads
each segment to a multiple of C with zero tokens (k = v = q = 0, β = g = 0: the identity map, output dropped), and
the scan restarts at a segment's first chunk, S_0 = 0. Rows are laid out side by side, padded to the same number
of chunks.

State from elsewhere (Note [Linear attention state passing], state_passing.py). A segment marked `link` continues a
document whose earlier tokens another rank holds, from a state S_in that is not known yet. The scan then carries,
next to the state S⁰ computed from S_in = 0, the transition P (dk × dk) from S_in: X = [S⁰ | P] starts at [0 | I]
and goes through the same maps (P ↦ A P). After the scan, a chunk's true start state is S⁰ + P S_in, and the end of
a run of chunks gives the run's own map (A_run, B_run) = (P_end, S⁰_end), which is what ranks exchange.

Blocks. The maps of every chunk at once would be ~13 KiB per token and value head in fp32 (dk = dv = 128), all of it
kept for the backward; and a scan that reads chunk c as `maps[:, :, c]` of whole-sequence tensors gets back, in the
backward, one whole-sequence gradient per chunk: O(chunks²) memory traffic (one layer's step took 3.9× as long at
128K tokens as at 64K on an H200, device call 31). So the chunks go through in blocks of BLOCK_CHUNKS. A block
computes its maps, scans them from the carry the block before it ended with (S⁰, and P when linking) and yields its
outputs, or its share of the run maps, and its own end carry. Each block is recomputed in its backward (activation
checkpointing): what stays from forward to backward is the chunked inputs, in the model's dtype, and one carry per
block; a backward holds one block's maps at a time. Inside a block the scan unbinds the maps once, so its backward
joins their gradients once. With state passing the blocks run twice: once for the run maps, and after the exchange
for the outputs.

    chunked q, k, v, g, β ──┬────────────────┬────────────────┬─── …
                            ▼                ▼                ▼
                zeros ─▶ [block 0] ─carry─▶ [block 1] ─carry─▶ [block 2] ─▶ …    maps, scan, outputs per block
                            │ out            │ out            │ out
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from longseq.parallel.sizes import BLOCK_CHUNKS, CHUNK_TOKENS


@dataclass(frozen=True, kw_only=True)
class Segment:
    """Consecutive tokens of one document in one row of the local sequence."""

    start: int
    """Offset of the first token in the row's local tokens."""
    length: int
    linked: bool = False
    """Whether the segment continues from a state computed elsewhere (S_in) rather than from zero."""
    run: int = 0
    """Which incoming state S_in continues it (an index into the incoming states of its row); read if `linked`."""


@dataclass(frozen=True, kw_only=True)
class ChunkLayout:
    """Where each local token sits among the chunks, and how the scan starts each chunk. Rows × `chunks` chunks."""

    rows: int
    chunks: int
    dest: torch.Tensor
    """(rows · local length,) the flat chunk-token slot of each token (row-major); a block's layout keeps the whole
    layout's."""
    keep: torch.Tensor
    """(rows, chunks) 1.0 where a chunk continues from the chunk before it, 0.0 where the state restarts."""
    link: torch.Tensor
    """(rows, chunks) 1.0 on the first chunk of a linked segment: the transition P restarts at I there."""
    chunk_run: torch.Tensor
    """(rows, chunks) the incoming state that each chunk's transition refers to."""
    run_ends: torch.Tensor
    """(rows, runs) the last chunk of each of the rank's runs (their maps are exchanged); (rows, 0) without state
    passing; −1 in a block's layout where the run ends outside the block."""
    block_chunks: int
    """Chunks that go through the maps and the scan together (Note [Chunked gated delta rule], Blocks)."""

    def block(self, start: int, stop: int) -> ChunkLayout:
        """Chunks start..stop − 1 as a layout of their own (Note [Chunked gated delta rule], Blocks)."""
        ends = self.run_ends - start
        return dataclasses.replace(
            self, chunks=stop - start, keep=self.keep[:, start:stop], link=self.link[:, start:stop],
            chunk_run=self.chunk_run[:, start:stop], run_ends=ends.masked_fill((ends < 0) | (ends >= stop - start), -1),
        )


def chunk_layout(segments: list[list[Segment]], local_length: int, run_ends: list[list[int]] | None = None,
                 device=None, chunk: int = CHUNK_TOKENS, block_chunks: int | None = None) -> ChunkLayout:
    """Lay each row's segments out on chunk boundaries. `run_ends[row][r]` names the segment (by index in the row)
    that ends run r; the layout turns it into that segment's last chunk. Blocks of `block_chunks` chunks (None:
    BLOCK_CHUNKS)."""
    rows = [_row_chunks(row_segments, chunk) for row_segments in segments]
    chunks = max(len(row["keep"]) for row in rows)
    dest = torch.empty(len(rows) * local_length, dtype=torch.long)
    for r, (row, row_segments) in enumerate(zip(rows, segments)):
        for first, segment in zip(row["first"], row_segments):
            source, target = r * local_length + segment.start, (r * chunks + first) * chunk
            dest[source:source + segment.length] = torch.arange(target, target + segment.length)

    def table(name, fill):
        return torch.tensor([row[name] + [fill] * (chunks - len(row[name])) for row in rows], device=device)

    ends = [[row["last"][s] for s in (run_ends[r] if run_ends else [])] for r, row in enumerate(rows)]
    return ChunkLayout(rows=len(rows), chunks=chunks, dest=dest.to(device), keep=table("keep", 0.0),
                       link=table("link", 0.0), chunk_run=table("run", 0),
                       run_ends=torch.tensor(ends, dtype=torch.long, device=device).view(len(rows), -1),
                       block_chunks=block_chunks or BLOCK_CHUNKS)


def _row_chunks(segments: list[Segment], chunk: int) -> dict:
    """One row: each segment's first and last chunk, and per chunk keep, link and run."""
    row = dict(first=[], last=[], keep=[], link=[], run=[])
    for segment in segments:
        count = -(-segment.length // chunk)
        row["first"].append(len(row["keep"]))
        row["keep"] += [0.0] + [1.0] * (count - 1)
        row["link"] += [float(segment.linked)] + [0.0] * (count - 1)
        row["run"] += [segment.run] * count
        row["last"].append(len(row["keep"]) - 1)
    return row


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|² + eps) over the last dim, as the models' kernels compute it (in fp32)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def to_chunks(x: torch.Tensor, layout: ChunkLayout, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """(B, L, H, ...) token-major → (B, H, n, C, ...) on the layout's chunk slots (zeros elsewhere). index_put, unlike
    index_copy, keeps only the index for its backward, not x."""
    flat = x.flatten(0, 1)
    slots = flat.new_zeros(layout.rows * layout.chunks * chunk, *flat.shape[1:]).index_put((layout.dest,), flat)
    slots = slots.view(layout.rows, layout.chunks, chunk, *flat.shape[1:])
    return slots.movedim(3, 1)


def from_chunks(x: torch.Tensor, layout: ChunkLayout, local_length: int) -> torch.Tensor:
    """(B, H, n, C, D) → (B, L, H, D): each token's value read back from its chunk slot."""
    flat = x.movedim(1, 3).flatten(0, 2)
    return flat.index_select(0, layout.dest).view(layout.rows, local_length, *flat.shape[1:])


@dataclass(frozen=True)
class ChunkMaps:
    """Each chunk's affine maps (Note [Chunked gated delta rule]), fp32, shapes (B, H, n, ...)."""

    transition: torch.Tensor  # A (dk × dk)
    update: torch.Tensor  # B (dk × dv)
    read: torch.Tensor  # R (C × dk)
    local: torch.Tensor  # O₀ (C × dv)


def chunk_maps(q, k, v, g, beta) -> ChunkMaps:
    """q, k (B, H, n, C, dk) unit-length (q also scaled), v (B, H, n, C, dv), g, beta (B, H, n, C); all fp32."""
    size = q.shape[-2]
    gamma = g.cumsum(-1)
    lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    decay = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()  # D
    k_beta = k * beta.unsqueeze(-1)
    system = (k_beta @ k.transpose(-1, -2)) * decay  # I + L once its diagonal is read as 1
    right = torch.cat([v * beta.unsqueeze(-1), k_beta * gamma.exp().unsqueeze(-1)], dim=-1)
    solved = torch.linalg.solve_triangular(system, right, upper=False, unitriangular=True)
    values, weights = solved.split([v.shape[-1], k.shape[-1]], dim=-1)  # U₀, W
    scores = (q @ k.transpose(-1, -2)) * decay
    read = q * gamma.exp().unsqueeze(-1) - scores @ weights
    k_tail = k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)  # K̃
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    transition = gamma[..., -1, None, None].exp() * eye - k_tail.transpose(-1, -2) @ weights
    return ChunkMaps(transition, k_tail.transpose(-1, -2) @ values, read, scores @ values)


@dataclass(frozen=True)
class Scan:
    """Per chunk, the start state from S_in = 0 (B, H, n, dk, dv) and, when linking, the transition from S_in
    (B, H, n, dk, dk; None otherwise); per run, its map (A_run, B_run) (B, H, runs, dk, dk / dv; None without runs;
    zero for a run that ends outside a block); the carry after the last chunk (S⁰, and P or None)."""

    starts: torch.Tensor
    transitions: torch.Tensor | None
    run_maps: tuple[torch.Tensor, torch.Tensor] | None
    end: tuple[torch.Tensor, torch.Tensor | None]


def scan(maps: ChunkMaps, layout: ChunkLayout, linking: bool,
         carry: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Scan:
    """S_c = A_c S_{c−1} + B_c over the chunks of every row and head, restarting where the layout says, from `carry`
    (the end of the block before; zeros if None)."""
    rows, heads, _, dk, dv = maps.update.shape
    if carry is None:
        carry = (maps.update.new_zeros(rows, heads, dk, dv),
                 maps.update.new_zeros(rows, heads, dk, dk) if linking else None)
    state, transition = carry
    eye = torch.eye(dk, dtype=state.dtype, device=state.device)
    keep, link = (x.to(state.dtype)[:, :, None, None, None].unbind(1) for x in (layout.keep, layout.link))
    starts, transitions = [], []
    for a, b, kept, linked in zip(maps.transition.unbind(2), maps.update.unbind(2), keep, link):
        state = state * kept
        starts.append(state)
        state = a @ state + b
        if linking:
            transition = transition * kept + linked * eye
            transitions.append(transition)
            transition = a @ transition
    starts = torch.stack(starts, dim=2)
    transitions = torch.stack(transitions, dim=2) if linking else None
    run_maps = _run_maps(maps, starts, transitions, layout) if linking else None
    return Scan(starts, transitions, run_maps, (state, transition))


def _run_maps(maps: ChunkMaps, starts, transitions, layout: ChunkLayout):
    """(A_run, B_run) at each run's last chunk: that chunk's map applied to its start (zero where it is not here)."""
    if layout.run_ends.shape[1] == 0:
        return None
    here = (layout.run_ends >= 0)[:, None, :, None, None]

    def at_ends(x):
        index = layout.run_ends.clamp(min=0)[:, None, :].expand(-1, x.shape[1], -1)
        return x.gather(2, index.reshape(*index.shape, 1, 1).expand(-1, -1, -1, *x.shape[-2:]))

    a = at_ends(maps.transition)
    transition, update = a @ at_ends(transitions), a @ at_ends(starts) + at_ends(maps.update)
    return torch.where(here, transition, 0.0), torch.where(here, update, 0.0)


def chunk_outputs(maps: ChunkMaps, result: Scan, incoming: torch.Tensor | None, layout: ChunkLayout) -> torch.Tensor:
    """Every chunk's outputs, O = R S_start + O₀ (B, H, n, C, dv); `incoming` (B, H, runs, dk, dv) or None."""
    start = result.starts
    if incoming is not None:
        index = layout.chunk_run[:, None, :].expand(-1, incoming.shape[1], -1)
        per_chunk = incoming.gather(2, index.reshape(*index.shape, 1, 1).expand(-1, -1, -1, *incoming.shape[-2:]))
        start = start + result.transitions @ per_chunk
    return maps.read @ start + maps.local


def prepare(q, k, v, g, beta, layout: ChunkLayout):
    """Token-major model tensors → chunked fp32 inputs of chunk_maps (`normalized` of `chunked`)."""
    return normalized(*chunked(q, k, v, g, beta, layout))


def chunked(q, k, v, g, beta, layout: ChunkLayout):
    """Token-major model tensors → (B, H, n, C, ...) on the layout's chunk slots, in their own dtypes and heads."""
    return tuple(to_chunks(x, layout) for x in (q, k, v, g, beta))


def normalized(q, k, v, g, beta):
    """Chunked model tensors → the inputs of chunk_maps: q, k l2-normalised, q scaled by dk^-½, key heads repeated
    for grouped value heads (each key head serves Hv/Hk consecutive value heads); fp32 (fp64 stays)."""
    groups = v.shape[1] // k.shape[1]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=1), k.repeat_interleave(groups, dim=1)
    dtype = torch.promote_types(v.dtype, torch.float32)
    q = l2_normalize(q.to(dtype))
    q = q * q.shape[-1] ** -0.5
    k = l2_normalize(k.to(dtype))
    return q, k, v.to(dtype), g.to(dtype), beta.to(dtype)


def gated_delta_rule(q, k, v, g, beta, layout: ChunkLayout, incoming=None) -> torch.Tensor:
    """The gated delta rule over the layout's segments, without state from elsewhere (`incoming` None) or with the
    incoming states (B, H, runs, dk, dv) of linked segments. q, k (B, L, Hk, dk), v (B, L, Hv, dv), g, beta
    (B, L, Hv); returns (B, L, Hv, dv) in v's dtype."""
    blocks = in_blocks(chunked(q, k, v, g, beta, layout), layout.block_chunks)
    return from_chunks(block_outputs(blocks, layout, incoming), layout, q.shape[1])


def in_blocks(tensors, block_chunks: int) -> list[tuple[torch.Tensor, ...]]:
    """`chunked`'s tensors cut into blocks of `block_chunks` chunks: (q, k, v, g, beta) per block. One split per
    tensor, so that the backward joins the blocks' gradients once."""
    pieces = [x.split(block_chunks, dim=2) for x in tensors]
    return list(zip(*pieces))


def block_outputs(blocks, layout: ChunkLayout, incoming=None) -> torch.Tensor:
    """Every chunk's outputs (B, H, n, C, dv) in v's dtype, block by block (Note [Chunked gated delta rule], Blocks)."""
    state = transition = None
    start, outputs = 0, []
    for block in blocks:
        stop = start + block[0].shape[2]
        out, state, transition = _recomputed(_block_outputs, *block, state, transition, incoming,
                                             layout.block(start, stop))
        outputs.append(out)
        start = stop
    return torch.cat(outputs, dim=2)


def block_run_maps(blocks, layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each run's map (A_run, B_run) (B, H, runs, dk, dk / dv), block by block, carrying the transition P."""
    state = transition = total = None
    start = 0
    for block in blocks:
        stop = start + block[0].shape[2]
        run_maps, state, transition = _recomputed(_block_run_maps, *block, state, transition,
                                                  layout.block(start, stop))
        total = run_maps if total is None else (total[0] + run_maps[0], total[1] + run_maps[1])
        start = stop
    return total


def _recomputed(fn, *args):
    """fn(*args), its intermediates recomputed in the backward rather than kept (the tensors among args are kept)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _block_outputs(q, k, v, g, beta, state, transition, incoming, layout: ChunkLayout):
    maps = chunk_maps(*normalized(q, k, v, g, beta))
    carry = None if state is None else (state, transition)
    result = scan(maps, layout, linking=incoming is not None, carry=carry)
    return chunk_outputs(maps, result, incoming, layout).to(v.dtype), *result.end


def _block_run_maps(q, k, v, g, beta, state, transition, layout: ChunkLayout):
    carry = None if state is None else (state, transition)
    result = scan(chunk_maps(*normalized(q, k, v, g, beta)), layout, linking=True, carry=carry)
    return result.run_maps, *result.end
