r"""Note [Sliding windows on blocks]

A sliding-window layer lets query i see key j when 0 <= i − j < w (transformers' convention). On the blocks of
Note [Ring attention] (global positions: a query range Q = [q0, q0 + nq) and a key range K = [k0, k0 + nk)):

- a causal square (Q = K) no longer than w is untouched (its largest distance is nq − 1 < w); a longer one is cut
  by the window;
- a full block (K entirely before Q) is skipped when even its nearest pair, q0 − (k0 + nk − 1), is >= w; untouched
  when its farthest pair, (q0 + nq − 1) − k0, is < w; otherwise cut: only the queries before k0 + nk − 1 + w and
  the keys after q0 − w can meet, so the block shrinks to those before it is computed.

A cut block is a band: with offset = (first query's position) − (first key's position), local query i sees local
key j when 0 <= offset + i − j < w. The flash kernels take only top-left causal masks, so a band runs here, in
fp32 math, over chunks of query rows, each against the keys its rows can reach ([offset + i0 − w + 1, offset + i1)):
O(rows · (rows + w)) scores per chunk, never the whole block. Its forward returns (out, lse) and its backward takes
the final (merged) output and log-sum-exp, like the flash kernels (kernels.py), so a band merges and differentiates
like any other block:

    P = exp(s − L) (0 outside the band),  dV = Pᵀ·dO,  dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)),  dQ = dS·K·scale,
    dK = dSᵀ·Q·scale

Only the cut blocks run here: for w much smaller than the block (GPT-OSS: 128) the band is a sliver of the work;
for a large w (Mistral's 4096) under ring it costs about 2w scores per query in math instead of w in a flash kernel.

    w = 3, one causal square of 6 tokens (x seen, . not):     a full block cut to its corner (offset 3):
        x . . . . .                                              k: 0 1 2
        x x . . . .                                       q 0    . x x
        x x x . . .                                       q 1    . . x
        . x x x . .                                       q 2    . . .   (dropped: the block shrinks to q 0..1,
        . . x x x .                                                        k 1..2)
        . . . x x x
"""

from __future__ import annotations

import torch

from longseq.parallel.local import expand_kv
from longseq.parallel.merge import accumulation_dtype
from longseq.parallel.sizes import band_rows


def window_cut(q0: int, nq: int, k0: int, nk: int, causal: bool, window: int):
    """How the window w cuts a block of global query range [q0, q0 + nq) and key range [k0, k0 + nk).

    Returns None (nothing seen), "whole" (untouched), or (q_stop, k_start, offset): the block shrunk to local
    queries [0, q_stop) and keys [k_start, nk), a band of that offset.
    """
    if causal:
        return "whole" if nq <= window else (nq, 0, 0)
    nearest, farthest = q0 - (k0 + nk - 1), q0 + nq - 1 - k0
    if nearest >= window:
        return None
    if farthest < window:
        return "whole"
    q_stop = min(nq, k0 + nk - 1 + window - q0)
    k_start = max(0, q0 - window + 1 - k0)
    return q_stop, k_start, q0 - (k0 + k_start)


def _row_chunks(q: torch.Tensor, nk: int, offset: int, window: int):
    """(i0, i1, j0, j1): chunks of query rows (sizes.band_rows) and the keys they can reach."""
    batch, heads, nq, _ = q.shape
    rows = band_rows(batch, heads, nq, nk, window)
    for i0 in range(0, nq, rows):
        i1 = min(i0 + rows, nq)
        j0, j1 = max(0, offset + i0 - window + 1), min(nk, offset + i1)
        yield i0, i1, j0, max(j0, j1)


def _scores(q, k, i0, i1, j0, j1, offset, window, scale, acc):
    """Band-masked scores (−inf outside) of query rows [i0, i1) against keys [j0, j1), in the accumulation dtype."""
    groups = q.shape[1] // k.shape[1]
    s = q[:, :, i0:i1].to(acc) @ expand_kv(k[:, :, j0:j1], groups).to(acc).transpose(-1, -2) * scale
    distance = offset + torch.arange(i0, i1, device=q.device)[:, None] - torch.arange(j0, j1, device=q.device)
    return s.masked_fill((distance < 0) | (distance >= window), float("-inf"))


def band_forward(q, k, v, *, offset: int, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, lse in the accumulation dtype) of a band; rows that see no key get (0, −inf)."""
    acc = accumulation_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    for i0, i1, j0, j1 in _row_chunks(q, k.shape[2], offset, window):
        if j0 == j1:
            continue
        s = _scores(q, k, i0, i1, j0, j1, offset, window, scale, acc)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse.masked_fill(row_lse == float("-inf"), 0.0).unsqueeze(-1))
        out[:, :, i0:i1] = (p @ expand_kv(v[:, :, j0:j1], groups).to(acc)).to(q.dtype)
        lse[:, :, i0:i1] = row_lse
    return out, lse


def band_backward(dout, q, k, v, out, lse, *, offset: int, window: int, scale: float, grad_dtype=None):
    """q/k/v gradients of a band given the final output and log-sum-exp (Note [Sliding windows on blocks]); dk, dv
    have k's heads; dtype: grad_dtype, by default the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    kv_heads, groups = k.shape[1], q.shape[1] // k.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk, dv = (torch.zeros(k.shape, dtype=acc, device=q.device) for _ in range(2))
    delta = (dout.to(acc) * out.to(acc)).sum(-1)

    def fold(grad):  # the adjoint of expand_kv: sum the gradients of each kv head's copies
        return grad.unflatten(1, (kv_heads, groups)).sum(2)

    for i0, i1, j0, j1 in _row_chunks(q, k.shape[2], offset, window):
        if j0 == j1:
            continue
        p = torch.exp(_scores(q, k, i0, i1, j0, j1, offset, window, scale, acc) - lse[:, :, i0:i1, None].to(acc))
        do = dout[:, :, i0:i1].to(acc)
        dv[:, :, j0:j1] += fold(p.transpose(-1, -2) @ do)
        ds = p * (do @ expand_kv(v[:, :, j0:j1], groups).to(acc).transpose(-1, -2) - delta[:, :, i0:i1, None])
        dq[:, :, i0:i1] += ds @ expand_kv(k[:, :, j0:j1], groups).to(acc) * scale
        dk[:, :, j0:j1] += fold(ds.transpose(-1, -2) @ q[:, :, i0:i1].to(acc)) * scale
    dtype = grad_dtype or acc
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)
