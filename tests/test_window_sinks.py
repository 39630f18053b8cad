"""Sliding windows and attention sinks on longseq's block kernels (parallel/window.py, parallel/sinks.py), alone and
in a ring, against unsharded float64 attention: outputs and q/k/v/sink gradients, packed documents, GQA, batch 2.

    PYTHONPATH=src python -m pytest -q tests/test_window_sinks.py
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longseq.parallel import ring_plan
from longseq.parallel.balance import portion_positions
from longseq.parallel.ring import ring_attention
from longseq.parallel.window import band_backward, band_forward, window_cut
from tests.distributed import run_distributed

LOCAL_LEN = 24
FP32 = dict(atol=2e-5, rtol=1e-4)
# (window, per batch row the document starts after 0 (None: one document), with sinks): windows shorter than a
# zigzag chunk, longer than one, and 1; a 1-token document; batch 2 with different documents
CASES = [
    (5, None, True),
    (17, ([1, 9, 13], [12, 13]), True),
    (1, ([20],), False),
    (40, ([3], []), True),
    (None, ([6], []), True),
]


def _reference(q, k, v, grad, sinks, boundaries, window, scale):
    """float64 attention with a causal, same-document, in-window mask and the sink as one more column."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    sinks = None if sinks is None else sinks.detach().double().requires_grad_()
    batch, heads, length, _ = q.shape
    doc = torch.zeros(batch, length, dtype=torch.long)
    for row, starts in enumerate(boundaries or [[0, length]] * batch):
        for start in starts[1:-1]:
            doc[row, start:] += 1
    pos = torch.arange(length)
    distance = pos[:, None] - pos[None, :]
    allowed = (distance >= 0) & (doc[:, :, None] == doc[:, None, :])
    if window is not None:
        allowed = allowed & (distance < window)
    groups = heads // k.shape[1]
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(batch, heads, length, 1)], dim=-1)
    probs = scores.softmax(-1)[..., :length]
    out = probs @ v.repeat_interleave(groups, 1)
    out.backward(grad.double())
    return [out.detach(), q.grad, k.grad, v.grad] + ([] if sinks is None else [sinks.grad])


def _check(group, ring_size: int, rank: int, window, rows, with_sinks: bool, heads=(4, 2)):
    length = ring_size * LOCAL_LEN
    gen = torch.Generator().manual_seed(3)
    batch = 1 if rows is None else len(rows)
    q = torch.randn(batch, heads[0], length, 8, generator=gen)
    k, v = (torch.randn(batch, heads[1], length, 8, generator=gen) for _ in range(2))
    grad = torch.randn(q.shape, generator=gen)
    sinks = torch.randn(heads[0], generator=gen) if with_sinks else None
    boundaries = None if rows is None else [[0, *starts, length] for starts in rows]
    expected = _reference(q, k, v, grad, sinks, boundaries, window, 0.35)
    pos = portion_positions(length, ring_size, rank)
    local = [t[:, :, pos].clone().requires_grad_() for t in (q, k, v)]
    local_sinks = None if sinks is None else sinks.clone().requires_grad_()
    out = ring_attention(group, *local, scale=0.35, boundaries=boundaries, window=window, sinks=local_sinks)
    out.backward(grad[:, :, pos])
    got = [out] + [t.grad for t in local]
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g.double(), want[:, :, pos], **FP32,
                                   msg=lambda m: f"R={ring_size}, window={window}, {rows}, {name}: {m}")
    if sinks is not None:
        dsinks = local_sinks.grad.clone()
        if group is not None:
            dist.all_reduce(dsinks, group=group)  # each rank holds its own rows' share
        torch.testing.assert_close(dsinks.double(), expected[4], **FP32)


@pytest.mark.parametrize("window,rows,with_sinks", CASES)
def test_without_ring(window, rows, with_sinks):
    _check(None, 1, 0, window, rows, with_sinks)


def _ring(ring_size: int):
    for window, rows, with_sinks in CASES:
        _check(dist.group.WORLD, ring_size, dist.get_rank(), window, rows, with_sinks)
    _check(dist.group.WORLD, ring_size, dist.get_rank(), 7, None, True, heads=(4, 1))


@pytest.mark.parametrize("ring_size", [2, 4])
def test_ring(ring_size):
    run_distributed(_ring, ring_size, ring_size)


def test_window_skips_blocks_out_of_reach():
    """A window shorter than a chunk leaves only the diagonal squares and the corners next to them: no far block."""
    for rank in range(4):
        (run,) = ring_plan._plan(None, None, 1, 64, 4, rank, window=8)
        for calls in run.steps:
            for call in calls:
                assert call.band is not None  # every block is cut: 32-token chunks, 8-token window
                assert call.q.stop - call.q.start <= 32 and call.k.stop - call.k.start <= 32
                if not call.causal and call.band[0] > 0:  # a corner: at most 7 × 7
                    assert call.q.stop - call.q.start <= 7 and call.k.stop - call.k.start <= 7
    assert window_cut(100, 10, 0, 50, False, 40) is None
    assert window_cut(100, 10, 80, 20, False, 40) == "whole"
    assert window_cut(10, 10, 10, 10, True, 10) == "whole"


def test_band_in_small_chunks(monkeypatch):
    """Bands computed a few rows at a time equal the same band computed in one chunk."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, 30, 8, generator=gen) for _ in range(4))
    k, v = k[:, :2], v[:, :2]
    whole = band_forward(q, k, v, offset=3, window=6, scale=0.4)
    grads = band_backward(dout, q, k, v, *whole, offset=3, window=6, scale=0.4)
    monkeypatch.setattr("longseq.parallel.sizes.BAND_SCORES", 2 * 4 * 12 * 3)
    chunked = band_forward(q, k, v, offset=3, window=6, scale=0.4)
    for got, want in zip(chunked + band_backward(dout, q, k, v, *whole, offset=3, window=6, scale=0.4),
                         whole + grads):
        torch.testing.assert_close(got, want)


def test_errors():
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="window=0 must be a positive"):
        ring_attention(None, q, q, q, scale=1.0, window=0)
    with pytest.raises(ValueError, match=r"one logit per query head \(4,\)"):
        ring_attention(None, q, q, q, scale=1.0, sinks=torch.zeros(2))
