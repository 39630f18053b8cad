"""Note [Document placement]: every token placed once, work per rank within the bound, per ring step too, and a
ring step of many documents runs as a few variable-length kernel calls.

Run: PYTHONPATH=src python -m pytest -q tests/test_balance.py
"""

from __future__ import annotations

import math
import random

import pytest

from longseq.parallel import ring as ring_module
from longseq.parallel import ring_plan
from longseq.parallel.balance import attention_work, document_layout, layout_order, zigzag_layout
from longseq.parallel.varlen import Group


def _row(seed: int, length: int, shortest: int = 8) -> list[int]:
    """Document boundaries of a row packed from lengths drawn log-uniformly from `shortest` to `length`."""
    rng = random.Random(seed)
    bounds = [0]
    while bounds[-1] < length:
        bounds.append(min(length, bounds[-1] + int(math.exp(rng.uniform(math.log(shortest), math.log(length))))))
    return bounds


def _tails_work(bounds: list[int], ring: int) -> int:
    """The bound of the Note: Σ_d e_d·L_d, the work of the tokens that are not zigzagged."""
    return sum((b - a) % (2 * ring) * (b - a) for a, b in zip(bounds, bounds[1:]))


def _brute_work(bounds: list[int], layout) -> list[int]:
    doc_start = {}
    for a, b in zip(bounds, bounds[1:]):
        doc_start.update({t: a for t in range(a, b)})
    return [sum(t - doc_start[t] + 1 for start, n in portion for t in range(start, start + n)) for portion in layout]


@pytest.mark.parametrize("ring", [2, 3, 4])
def test_every_token_is_placed_once_in_equal_portions(ring):
    for seed in range(20):
        bounds = _row(seed, 240 * ring)
        layout = document_layout(bounds, ring)
        assert sorted(layout_order(layout).tolist()) == list(range(bounds[-1]))
        assert {sum(n for _, n in portion) for portion in layout} == {240}
        assert attention_work(bounds, layout) == _brute_work(bounds, layout)


def test_one_document_is_zigzag():
    assert document_layout([0, 96], 3) == zigzag_layout(96, 3)
    assert document_layout([0, 10, 96], 1) == zigzag_layout(96, 1)


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_work_per_rank_within_the_tails_bound_where_zigzag_is_not(ring):
    length = 4096 * ring
    zigzag_ratios = []
    for seed in range(30):
        bounds = _row(seed, length, shortest=32)
        work = attention_work(bounds, document_layout(bounds, ring))
        assert max(work) - min(work) <= _tails_work(bounds, ring), (bounds, work)
        assert max(work) <= 1.01 * sum(work) / ring
        zigzag = attention_work(bounds, zigzag_layout(length, ring))
        zigzag_ratios.append(max(zigzag) / (sum(zigzag) / ring))
    assert sum(zigzag_ratios) / len(zigzag_ratios) > 1.1  # what the rule fixes
    three_quarters = [0, 3 * length // 4, length]  # the worst simple case for zigzag at R = 2
    if ring == 2:
        zigzag = attention_work(three_quarters, zigzag_layout(length, ring))
        assert max(zigzag) / min(zigzag) > 3.9
        assert len(set(attention_work(three_quarters, document_layout(three_quarters, ring)))) == 1


def _step_work(items) -> float:
    calls = [c for item in items for c in (item.calls if isinstance(item, Group) else (item,))]
    return sum((c.q.stop - c.q.start) * ((c.k.stop - c.k.start + 1) / 2 if c.causal else c.k.stop - c.k.start)
               for c in calls)


@pytest.mark.parametrize("ring", [2, 4])
def test_every_ring_step_is_balanced_and_a_few_kernel_calls(ring):
    """Documents of lengths divisible by 2R: every rank does the same work at every step; with 40 documents a step
    is still at most 3 items (grouped calls), and the plan's work is the placement's."""
    rng = random.Random(0)
    lengths = [2 * ring * rng.randint(1, 12) for _ in range(40)]
    bounds = [0] + [sum(lengths[:i + 1]) for i in range(len(lengths))]
    layout = document_layout(bounds, ring)
    local = bounds[-1] // ring
    per_rank = []
    for rank in range(ring):
        (run,) = ring_plan._plan([bounds], [layout], 1, local, ring, rank)
        assert all(len(items) <= 3 for items in run.steps), [len(items) for items in run.steps]
        per_rank.append([_step_work(items) for items in run.steps])
    assert all(steps == per_rank[0] for steps in per_rank)
    assert [sum(steps) for steps in per_rank] == attention_work(bounds, layout)


def test_bad_layout_is_refused():
    import torch

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="one layout per batch row"):
        ring_module.ring_attention(None, q, q, q, scale=1.0, layouts=[])
    with pytest.raises(ValueError, match="without gaps or overlaps"):
        ring_module.ring_attention(None, q, q, q, scale=1.0, layouts=[(((0, 4), (3, 4)),)])
