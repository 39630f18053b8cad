"""Ring attention against unsharded float64 attention: outputs and q/k/v gradients, packed documents, GQA, batch > 1.

Run: PYTHONPATH=src python -m pytest -q tests/test_ring.py
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq.parallel import kernels
from longseq.parallel import ring_plan
from longseq.parallel.balance import document_layout, layout_order, portion_positions
from longseq.parallel.kernels import block_forward
from longseq.parallel.documents import document_boundaries
from longseq.parallel.merge import merge_, new_accumulators
from longseq.parallel.ring import ring_attention
from longseq.parallel.varlen import Group
from tests.distributed import run_distributed

LOCAL_LEN = 24  # tokens per rank: two zigzag chunks of 12
FP32 = dict(atol=2e-5, rtol=1e-4)
BF16 = dict(atol=3e-2, rtol=3e-2)


def _one_token_start(length: int) -> list[int]:
    """A 1-token document, one spanning several chunks (and ranks), a short one, the rest."""
    return [1, length // 2 + 5, 4, length - length // 2 - 10]


def _on_chunk_borders(length: int) -> list[int]:
    """A document ending on a chunk border, a 1-token document right after it, documents crossing chunk borders."""
    return [length // 4, 1, length // 4 + 3, 7, length - length // 2 - 11]


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    q_heads: int
    kv_heads: int
    rows: tuple | None  # per batch row, a function length -> document lengths; None = one document per row
    dtype: torch.dtype = torch.float32
    dim: int = 8


CASES = [
    Case("one document, batch 2", 2, 2, 2, None),
    Case("packed, batch 2 with different documents, GQA 4/2", 2, 4, 2, (_one_token_start, _on_chunk_borders)),
    Case("packed, MQA 4/1", 1, 4, 1, (_on_chunk_borders,)),
    Case("packed, batch 2 with the same documents", 2, 2, 2, (_one_token_start, _one_token_start)),
    Case("packed, GQA 4/2, bf16", 2, 4, 2, (_on_chunk_borders, _one_token_start), torch.bfloat16, 16),
]


def _inputs(case: Case, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, case.q_heads, length, case.dim, generator=gen)
    k, v = (torch.randn(case.batch, case.kv_heads, length, case.dim, generator=gen) for _ in range(2))
    grad = torch.randn(q.shape, generator=gen)
    boundaries = None
    if case.rows is not None:
        position_ids = torch.stack([torch.cat([torch.arange(n) for n in row(length)]) for row in case.rows])
        boundaries = document_boundaries(position_ids)
    return [t.to(case.dtype) for t in (q, k, v, grad)], boundaries


def _reference(q, k, v, grad, boundaries, scale):
    """Unsharded float64 attention with an explicit causal & same-document mask, and its q/k/v gradients."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    batch, _, length, _ = q.shape
    doc = torch.zeros(batch, length, dtype=torch.long)
    for row, starts in enumerate(boundaries or [[0, length]] * batch):
        for start in starts[1:-1]:
            doc[row, start:] += 1
    pos = torch.arange(length)
    mask = (pos[:, None] >= pos[None, :]) & (doc[:, :, None] == doc[:, None, :])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    out.backward(grad.double())
    return out.detach(), q.grad, k.grad, v.grad


def _check_case(group, ring_size: int, rank: int, case: Case, kernel: str = "sdpa", backward: bool = True,
                documents: bool = False) -> None:
    """documents: Note [Document placement] (per-row layouts) instead of zigzag."""
    length = ring_size * LOCAL_LEN
    (q, k, v, grad), boundaries = _inputs(case, length)
    scale = case.dim ** -0.5
    expected = _reference(q, k, v, grad, boundaries, scale)
    layouts = None
    if documents:
        layouts = [document_layout(row, ring_size) for row in boundaries or [[0, length]] * case.batch]
        pos = torch.stack([layout_order(layout)[rank * LOCAL_LEN:(rank + 1) * LOCAL_LEN] for layout in layouts])
    else:
        pos = portion_positions(length, ring_size, rank).expand(case.batch, -1)

    def mine(t):
        return torch.stack([row[:, p] for row, p in zip(t, pos)])

    local = [mine(t).requires_grad_(backward) for t in (q, k, v)]
    out = ring_attention(group, *local, scale=scale, boundaries=boundaries, layouts=layouts, kernel=kernel)
    tol = BF16 if case.dtype == torch.bfloat16 else FP32
    assert out.dtype == case.dtype
    results = [out]
    if backward:
        out.backward(mine(grad))
        results += [t.grad for t in local]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected):
        torch.testing.assert_close(
            got.double(), mine(want), **tol, msg=lambda m: f"{case.name}, R={ring_size}, {name}: {m}"
        )


def _count_exchanges(group, ring_size: int) -> None:
    """R − 1 K/V rotations forward; R − 1 K/V rotations and R dk/dv hops backward."""
    calls = []
    real = dist.batch_isend_irecv

    def counting(ops):
        calls.append(len(ops))
        return real(ops)

    q, k, v = (torch.randn(1, 2, LOCAL_LEN, 8, requires_grad=True) for _ in range(3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "batch_isend_irecv", counting)
        out = ring_attention(group, q, k, v, scale=0.3)
        assert len(calls) == ring_size - 1
        out.sum().backward()
    assert len(calls) == 3 * ring_size - 2
    assert calls == [4] * len(calls)  # k and v (or dk and dv): one send and one receive each


def _ring_cases(ring_size: int) -> None:
    group, rank = dist.group.WORLD, dist.get_rank()
    for case in CASES:
        _check_case(group, ring_size, rank, case)
        _check_case(group, ring_size, rank, case, documents=True)
    _count_exchanges(group, ring_size)
    odd = torch.randn(1, 2, LOCAL_LEN - 1, 8)
    with pytest.raises(ValueError, match="S_local = 23 is odd"):
        ring_attention(group, odd, odd, odd, scale=0.3)
    q = torch.randn(1, 2, LOCAL_LEN, 8)
    with pytest.raises(ValueError, match=f"= {ring_size * LOCAL_LEN} tokens"):
        ring_attention(group, q, q, q, scale=0.3, boundaries=[[0, 5, LOCAL_LEN]])


def _bf16_errors(ring_size: int, length: int) -> tuple[float, float]:
    """Max |error| vs float64 of the output in bf16: single local kernel call (R = 1), and this ring."""
    case = Case("bf16 precision", 1, 2, 2, None, torch.bfloat16, 64)
    (q, k, v, grad), boundaries = _inputs(case, length, seed=1)
    expected = _reference(q, k, v, grad, boundaries, 0.125)[0]
    single = (ring_attention(None, q, k, v, scale=0.125, boundaries=boundaries).double() - expected).abs().max()
    pos = portion_positions(length, ring_size, dist.get_rank())
    out = ring_attention(dist.group.WORLD, q[:, :, pos], k[:, :, pos], v[:, :, pos], scale=0.125,
                         boundaries=boundaries)
    ring = (out.double() - expected[:, :, pos]).abs().max()
    dist.all_reduce(ring, op=dist.ReduceOp.MAX)
    return single.item(), ring.item()


def _precision(ring_size: int) -> None:
    # The max error is set by the final cast to bf16, so it shows a ring that adds error to every output; growth with
    # the number of merged blocks is pinned down by test_merge_error_does_not_grow_with_block_count.
    single, ring = _bf16_errors(ring_size, ring_size * 128)
    assert ring <= 1.5 * single + 1e-4, f"R={ring_size}: ring error {ring:.3g} vs single-kernel {single:.3g}"


@pytest.mark.parametrize("ring_size", [2, 4])
def test_ring_matches_unsharded_reference(ring_size):
    run_distributed(_ring_cases, ring_size, ring_size)


def _math_block(q, k, v, causal: bool, scale: float):
    """A differentiable (out, lse) attention block: the contract of kernels.flex_forward, with a backward on CPU."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    out = (scores - lse.unsqueeze(-1)).exp() @ v.double()
    return out.to(q.dtype), lse.to(torch.promote_types(q.dtype, torch.float32))


def _flex_ring(ring_size: int) -> None:
    group, rank = dist.group.WORLD, dist.get_rank()
    # The real FlexAttention forward (CPU flex has no backward; bench/check_gpu.py runs it on CUDA) ...
    for case in CASES:
        _check_case(group, ring_size, rank, case, kernel="flex", backward=False)
    # ... and the recompute backward through a differentiable stand-in with flex's contract.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "flex_forward", _math_block)
        for case in CASES:
            _check_case(group, ring_size, rank, case, kernel="flex")
    with pytest.raises(ValueError, match="kernel='cudnn' is not one of"):
        ring_attention(group, *(torch.randn(1, 2, LOCAL_LEN, 8) for _ in range(3)), scale=0.3, kernel="cudnn")


@pytest.mark.parametrize("ring_size", [2, 4])
def test_flex_ring_kernel(ring_size):
    run_distributed(_flex_ring, ring_size, ring_size)


@pytest.mark.parametrize("ring_size", [2, 4])
def test_ring_bf16_error_does_not_grow_with_ring_size(ring_size):
    run_distributed(_precision, ring_size, ring_size)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_no_group_is_local_attention(case):
    _check_case(None, 1, 0, case)


def _calls(items) -> list:
    """The dense calls of a step's items (a Group stands for several)."""
    return [call for item in items for call in (item.calls if isinstance(item, Group) else (item,))]


def _area(calls) -> float:
    return sum((c.q.stop - c.q.start) * (c.k.stop - c.k.start) / (2 if c.causal else 1) for c in calls)


def test_work_per_step_is_balanced_and_skips_masked_blocks():
    """One document: every rank computes 2·c² scores per step (a causal c×c square counts c²/2)."""
    ring_size, chunk = 4, LOCAL_LEN // 2
    for rank in range(ring_size):
        (run,) = ring_plan._plan(None, None, 2, LOCAL_LEN, ring_size, rank)
        assert run.rows == slice(0, 2)  # rows without documents are batched
        for items in run.steps:
            assert _area(_calls(items)) == 2 * chunk * chunk
            assert len(_calls(items)) <= 3


def test_merge_rows_without_keys():
    out_acc, lse_acc = new_accumulators(torch.zeros(1, 3, 2))
    inf = float("inf")
    merge_(out_acc, lse_acc, torch.zeros(1, 3, 2), torch.tensor([[-inf, -inf, 0.0]]))
    merge_(out_acc, lse_acc, torch.ones(1, 3, 2), torch.tensor([[-inf, 1.0, -inf]]))
    assert not out_acc.isnan().any()
    torch.testing.assert_close(lse_acc, torch.tensor([[-inf, 1.0, 0.0]]))
    torch.testing.assert_close(out_acc, torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]))


def test_merge_error_does_not_grow_with_block_count():
    """bf16 blocks merged in fp32 stay as close to float64 as one kernel call; a bf16 accumulator grows ~9× at 128."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=gen).bfloat16() for n in (64, 2048, 2048))
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.125)
    errors = {}
    for blocks in (1, 8, 32, 128):
        out, lse = new_accumulators(q)
        for k_block, v_block in zip(k.chunk(blocks, 2), v.chunk(blocks, 2)):
            merge_(out, lse, *block_forward(q, k_block, v_block, causal=False, scale=0.125))
        errors[blocks] = (out.to(torch.bfloat16).double() - expected).abs().max().item()
    assert max(errors.values()) <= 1.5 * errors[1] + 1e-4, errors


def test_errors_name_the_problem():
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="must agree on batch, S_local and head_dim"):
        ring_attention(None, q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), scale=1.0)
    with pytest.raises(ValueError, match="of one shape"):
        ring_attention(None, q, torch.randn(1, 2, 8, 8), torch.randn(1, 1, 8, 8), scale=1.0)
    with pytest.raises(ValueError, match="Hq = 4 query heads is not a multiple of Hkv = 3"):
        ring_attention(None, q, torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), scale=1.0)
    with pytest.raises(ValueError, match="ends at 16, but the full sequence has R·S_local = 1·8 = 8 tokens"):
        ring_attention(None, q, q, q, scale=1.0, boundaries=[[0, 16]])
    with pytest.raises(ValueError, match="2 rows for a batch of 1"):
        ring_attention(None, q, q, q, scale=1.0, boundaries=[[0, 8], [0, 8]])
    with pytest.raises(ValueError, match="increase strictly"):
        ring_attention(None, q, q, q, scale=1.0, boundaries=[[0, 3, 3, 8]])
