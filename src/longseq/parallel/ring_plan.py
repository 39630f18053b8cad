"""Note [Ring plan]

Which kernel calls a ring rank runs at each step of ring attention (Note [Ring attention], ring.py), for any layout
of the row over the ranks (zigzag, or Note [Document placement], balance.py): the q chunks a rank holds against the
k chunks it holds at step s (those of rank (r − s) mod R), each pair of chunks cut as follows.

Packed documents (contiguous global ranges; a token attends to earlier tokens of its own document) need no mask:
- a causal square is cut into the document segments inside the chunk, one causal square each;
- a full block (k chunk j strictly before q chunk i) meets at most one document, the one holding the last token of
  k chunk j, and only if it reaches into q chunk i. Then its q tokens (a prefix of chunk i) attend to its k tokens
  (a suffix of chunk j), unmasked; every other q row gets nothing from this block.

        k chunk j: [ x x x | y y y y y ]          q chunk i: [ y y y | z z z z z ]
        block computed: q rows of y (prefix of i) × k columns of y (suffix of j)

Sliding windows cut the calls further (Note [Sliding windows on blocks], window.py). Neighbouring full blocks that
share their q or k range are joined into one call, and calls adjacent in both q and k form variable-length groups
(Note [Variable-length blocks], varlen.py). Rows with the same documents and layout share one plan (a run of rows),
and a plan is computed once per forward pass (every layer asks for the same; cached).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longseq.parallel.balance import Layout, zigzag_layout
from longseq.parallel.kernels import KERNELS
from longseq.parallel.varlen import Call, Group, group_calls
from longseq.parallel.window import window_cut


@dataclass(frozen=True)
class _Chunk:
    start: int  # global token offset
    local: int  # offset in its rank's portion
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Run:
    """Consecutive batch rows with the same documents and layout, and their kernel calls per ring step."""

    rows: slice
    steps: tuple[tuple[Call | Group, ...], ...]


def ring_plan(group, q, k, v, *, boundaries=None, layouts=None, kernel: str = "sdpa", window: int | None = None,
              sinks: torch.Tensor | None = None) -> tuple[Run, ...]:
    """Check ring_attention's inputs and return this rank's kernel calls per ring step (computed once per forward
    pass: every layer asks for the same)."""
    ring_size = ring_size_of(group)
    _check_inputs(q, k, v, ring_size, boundaries, layouts)
    if kernel not in KERNELS:
        raise ValueError(f"ring_attention: kernel={kernel!r} is not one of {KERNELS}.")
    if window is not None and window < 1:
        raise ValueError(f"ring_attention: window={window} must be a positive number of tokens (or None).")
    if sinks is not None and sinks.shape != (q.shape[1],):
        raise ValueError(f"ring_attention: sinks of shape {tuple(sinks.shape)} must hold one logit per query head "
                         f"({q.shape[1]},).")
    rank = 0 if group is None else dist.get_rank(group)
    return _plan(boundaries, layouts, q.shape[0], q.shape[2], ring_size, rank, window)



def ring_size_of(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _plan(boundaries, layouts, batch: int, local_len: int, ring_size: int, rank: int,
          window: int | None = None) -> tuple[Run, ...]:
    """Kernel calls per ring step, shared by the rows of each run of identical documents and layouts."""
    total = ring_size * local_len
    bounds = ((0, total),) * batch if boundaries is None else tuple(tuple(row) for row in boundaries)
    rows_layouts = (None,) * batch if layouts is None else tuple(layouts)
    return _cached_plan(bounds, rows_layouts, local_len, ring_size, rank, window)


@functools.lru_cache(maxsize=64)
def _cached_plan(bounds, layouts, local_len: int, ring_size: int, rank: int, window) -> tuple[Run, ...]:
    """Every layer of a forward pass asks for the same plan: it is computed once."""
    keys = [(b, layout or zigzag_layout(local_len * ring_size, ring_size)) for b, layout in zip(bounds, layouts)]
    runs, first = [], 0
    for row in range(1, len(keys) + 1):
        if row == len(keys) or keys[row] != keys[first]:
            runs.append(Run(slice(first, row), _run_steps(*keys[first], ring_size, rank, window)))
            first = row
    return tuple(runs)


def _run_steps(bounds, layout: Layout, ring_size: int, rank: int,
               window: int | None) -> tuple[tuple[Call | Group, ...], ...]:
    mine = _chunks(layout[rank])
    steps = []
    for step in range(ring_size):
        held = _chunks(layout[(rank - step) % ring_size])
        ends = [c.end for c in held]
        calls = [call for qc in mine for call in _chunk_calls(bounds, qc, held, ends, window)]
        steps.append(tuple(group_calls(_coalesce(calls))))
    return tuple(steps)


def _chunks(portion) -> tuple[_Chunk, ...]:
    """A portion's chunks with their local offsets, sorted by global start."""
    chunks, local = [], 0
    for start, length in portion:
        chunks.append(_Chunk(start, local, length))
        local += length
    return tuple(sorted(chunks, key=lambda c: c.start))


def _chunk_calls(bounds, qc: _Chunk, held: tuple[_Chunk, ...], ends: list[int], window: int | None) -> list[Call]:
    """The kernel calls of q chunk `qc` against the held k chunks (sorted by start, `ends` their ends) that can reach
    it: those ending inside or after the document holding qc's first token, and starting no later than qc; each as
    the sliding window cuts it."""
    doc_start = bounds[bisect.bisect_right(bounds, qc.start) - 1]
    first = bisect.bisect_right(ends, doc_start)
    calls = []
    for kc in held[first:]:
        if kc.start > qc.start:
            break
        calls += [cut for call in _pair_calls(bounds, qc, kc) if (cut := _in_window(call, qc, kc, window)) is not None]
    return calls


def _pair_calls(bounds, qc: _Chunk, kc: _Chunk) -> list[Call]:
    """The kernel calls of one (q chunk, k chunk) block under the documents `bounds`; see Note [Ring plan]."""
    if kc.start > qc.start:
        return []
    if kc.start == qc.start:
        return [
            Call(slice(qc.local + a - qc.start, qc.local + b - qc.start),
                 slice(kc.local + a - kc.start, kc.local + b - kc.start), True)
            for a, b in _segments(bounds, qc.start, qc.end)
        ]
    doc = bisect.bisect_right(bounds, kc.end - 1) - 1
    doc_start, doc_end = bounds[doc], bounds[doc + 1]
    if doc_end <= qc.start:
        return []
    q_len = min(doc_end, qc.end) - qc.start
    k_from = max(doc_start, kc.start) - kc.start
    return [Call(slice(qc.local, qc.local + q_len), slice(kc.local + k_from, kc.local + kc.length), False)]


def _in_window(call: Call, qc: _Chunk, kc: _Chunk, window: int | None) -> Call | None:
    """The call as the sliding window cuts it: skipped (None), whole, or a band (Note [Sliding windows on blocks])."""
    if window is None:
        return call
    q0, k0 = qc.start + call.q.start - qc.local, kc.start + call.k.start - kc.local
    cut = window_cut(q0, call.q.stop - call.q.start, k0, call.k.stop - call.k.start, call.causal, window)
    if cut is None or cut == "whole":
        return None if cut is None else call
    q_stop, k_start, offset = cut
    return Call(slice(call.q.start, call.q.start + q_stop), slice(call.k.start + k_start, call.k.stop), False,
                (offset, window))


def _segments(bounds, lo: int, hi: int):
    """The pieces [a, b) of documents that lie inside the token range [lo, hi)."""
    i = bisect.bisect_right(bounds, lo) - 1
    while bounds[i] < hi:
        yield max(bounds[i], lo), min(bounds[i + 1], hi)
        i += 1


def _coalesce(calls: list[Call]) -> list[Call]:
    """Join neighbouring full blocks that share their q or k range into one kernel call."""
    joined: list[Call] = []
    for call in calls:
        prev = joined[-1] if joined else None
        if prev is not None and not (prev.causal or call.causal or prev.band or call.band):
            if prev.k == call.k and prev.q.stop == call.q.start:
                joined[-1] = Call(slice(prev.q.start, call.q.stop), prev.k, False)
                continue
            if prev.q == call.q and prev.k.stop == call.k.start:
                joined[-1] = Call(prev.q, slice(prev.k.start, call.k.stop), False)
                continue
        joined.append(call)
    return joined


def _check_inputs(q, k, v, ring_size: int, boundaries, layouts) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"ring_attention: expected q (B, Hq, S_local, D) and k, v (B, Hkv, S_local, D) of one shape, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    batch, heads, local_len, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, local_len, dim):
        raise ValueError(
            f"ring_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, S_local and head_dim "
            "(dims 0, 2, 3); pass them as (batch, heads, tokens, head_dim)."
        )
    if heads % k.shape[1]:
        raise ValueError(
            f"ring_attention: Hq = {heads} query heads is not a multiple of Hkv = {k.shape[1]} key/value heads; "
            "GQA needs Hq % Hkv == 0 (check num_attention_heads and num_key_value_heads)."
        )
    if ring_size > 1 and local_len % 2 and layouts is None:
        raise ValueError(
            f"ring_attention: S_local = {local_len} is odd, but the zigzag layout gives every rank two equal chunks. "
            f"Pad the full sequence to a multiple of 2·R = {2 * ring_size} tokens before sharding (balance.py)."
        )
    if boundaries is not None:
        _check_boundaries(boundaries, batch, ring_size, local_len)
    if layouts is not None:
        _check_layouts(layouts, batch, ring_size, local_len)


def _check_layouts(layouts, batch: int, ring_size: int, local_len: int) -> None:
    if len(layouts) != batch or any(len(layout) != ring_size for layout in layouts):
        raise ValueError(
            f"ring_attention: layouts must hold one layout per batch row ({batch}) with one portion per ring rank "
            f"({ring_size}); got {len(layouts)} rows. Build them with balance.document_layout."
        )
    for i, layout in enumerate(layouts):
        covered = sorted(chunk for portion in layout for chunk in portion)
        if any(sum(n for _, n in portion) != local_len for portion in layout) or \
                any(a[0] + a[1] != b[0] for a, b in zip(covered, covered[1:])) or covered[0][0] != 0:
            raise ValueError(
                f"ring_attention: layouts[{i}] does not give every ring rank S_local = {local_len} tokens of one "
                "row without gaps or overlaps; build it with balance.document_layout from the row's boundaries."
            )


def _check_boundaries(boundaries, batch: int, ring_size: int, local_len: int) -> None:
    total = ring_size * local_len
    if len(boundaries) != batch:
        raise ValueError(
            f"ring_attention: boundaries has {len(boundaries)} rows for a batch of {batch}; pass one list per row."
        )
    for i, row in enumerate(boundaries):
        if row[-1] != total:
            raise ValueError(
                f"ring_attention: boundaries[{i}] ends at {row[-1]}, but the full sequence has R·S_local = "
                f"{ring_size}·{local_len} = {total} tokens. Compute boundaries from the FULL sequence's position_ids "
                "(documents.document_boundaries), not from this rank's slice."
            )
        if row[0] != 0 or any(a >= b for a, b in zip(row, row[1:])):
            raise ValueError(
                f"ring_attention: boundaries[{i}] = {row} must start at 0 and increase strictly "
                "(document starts, then the sequence length)."
            )
