"""The chunked gated delta rule and the document-aware causal convolution against token-by-token references (fp64):
outputs, states, run maps and every input gradient; odd lengths, packed documents, grouped value heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.live_tensors import BackwardAllocations
from longseq.parallel.causal_conv import causal_conv, conv_plan
from longseq.parallel.delta_rule import (
    Segment, block_outputs, block_run_maps, chunk_layout, chunk_maps, chunk_outputs, chunked, from_chunks,
    gated_delta_rule, in_blocks, l2_normalize, prepare, scan,
)

TOL = dict(atol=1e-10, rtol=1e-9)


def recurrence(q, k, v, g, beta, state=None):
    """Token by token (Note [Chunked gated delta rule]): outputs (B, L, Hv, dv) and the final state."""
    groups = v.shape[2] // k.shape[2]
    q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    q, k = l2_normalize(q) * q.shape[-1] ** -0.5, l2_normalize(k)
    rows, length, heads, dk = q.shape
    state = torch.zeros(rows, heads, dk, v.shape[-1], dtype=q.dtype) if state is None else state
    outputs = []
    for t in range(length):
        kt, bt = k[:, t, :, :, None], beta[:, t, :, None, None]
        state = g[:, t, :, None, None].exp() * (state - bt * kt @ (kt.transpose(-1, -2) @ state))
        state = state + bt * kt @ v[:, t, :, None, :]
        outputs.append((q[:, t, :, None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=1), state


def inputs(rows=2, length=150, k_heads=2, v_heads=4, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(rows, length, k_heads, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(rows, length, v_heads, dv, generator=g, dtype=torch.float64)
    decay = -0.2 * torch.rand(rows, length, v_heads, generator=g, dtype=torch.float64)
    beta = torch.rand(rows, length, v_heads, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, decay, beta)]


def per_document(fn, tensors, documents):
    """fn on each document of each row alone, concatenated back."""
    rows = []
    for row, bounds in enumerate(documents):
        rows.append(torch.cat([fn(*(t[row:row + 1, a:b] for t in tensors))
                               for a, b in zip(bounds[:-1], bounds[1:])], dim=1))
    return torch.cat(rows)


def _grads(out, tensors, seed=3):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), tensors)


@pytest.mark.parametrize("length,documents", [
    (1, None), (63, None), (64, None), (65, None), (150, None),
    (150, [[0, 1, 64, 100, 150], [0, 70, 71, 150]]),  # per row; one-token documents, chunk-aligned and not
])
def test_matches_recurrence(length, documents):
    tensors = inputs(length=length)
    documents = documents or [[0, length]] * 2
    segments = [[Segment(start=a, length=b - a) for a, b in zip(row[:-1], row[1:])] for row in documents]
    out = gated_delta_rule(*tensors, chunk_layout(segments, length))
    ref = per_document(lambda *t: recurrence(*t)[0], tensors, documents)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(_grads(out, tensors), _grads(ref, tensors)):
        torch.testing.assert_close(got, want, **TOL)


def test_linked_runs_compose():
    """A run that continues from an unknown state: its outputs from S_in, and its map S_out = A·S_in + B."""
    q, k, v, g, beta = inputs(length=150)
    cut = 70
    head = [t[:, :cut] for t in (q, k, v, g, beta)]
    tail = [t[:, cut:] for t in (q, k, v, g, beta)]
    ref, final = recurrence(q, k, v, g, beta)
    _, middle = recurrence(*head)
    layout = chunk_layout([[Segment(start=0, length=150 - cut, linked=True)]] * 2, 150 - cut, run_ends=[[0]] * 2)
    maps = chunk_maps(*prepare(*tail, layout))
    result = scan(maps, layout, linking=True)
    out = from_chunks(chunk_outputs(maps, result, middle.unsqueeze(2), layout), layout, 150 - cut)
    torch.testing.assert_close(out, ref[:, cut:], **TOL)
    transition, update = result.run_maps
    torch.testing.assert_close((transition @ middle.unsqueeze(2) + update).squeeze(2), final, **TOL)


def test_matches_transformers_kernel():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    q, k, v, g, beta = (t.detach().float() for t in inputs(length=150))
    # transformers 5.17's kernel wants key heads already repeated for the value heads (5.24 repeats them itself)
    repeated = (t.repeat_interleave(2, dim=2) for t in (q, k))
    ref, _ = torch_chunk_gated_delta_rule(*repeated, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    out = gated_delta_rule(q, k, v, g, beta, chunk_layout([[Segment(start=0, length=150)]] * 2, 150))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_causal_conv_documents_and_halo():
    """Stream layout: per-document convolution, and a run that continues from halo tokens."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    halo = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    halo[0, 0] = 0  # row 0: a document starts two tokens before the run
    documents = [[0, 9, 10, 40], [0, 40]]
    plan = conv_plan([[(0, 40, row[1:-1])] for row in documents], 40, 4)
    out = causal_conv(x, halo, weight, None, "silu", plan)

    def reference(piece):  # (1, n, C) → causal convolution with zeros before it
        return F.silu(F.conv1d(F.pad(piece.transpose(1, 2), (3, 0)), weight.unsqueeze(1), groups=6)).transpose(1, 2)

    with_halo = torch.cat([halo, x], dim=1)
    ref = torch.cat([
        torch.cat([reference(with_halo[:1, 1:12])[:, 2:], reference(x[:1, 9:10]), reference(x[:1, 10:])], dim=1),
        reference(with_halo[1:])[:, 3:],
    ])
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(_grads(out, (x, weight)), _grads(ref, (x, weight))):
        torch.testing.assert_close(got, want, **TOL)


def _blocked(tensors, layout, block_chunks, incoming=None):
    """Outputs (B, H, n, C, dv) and, with `incoming`, run maps, through blocks of `block_chunks` chunks."""
    blocks = in_blocks(chunked(*tensors, layout), block_chunks)
    out = block_outputs(blocks, layout, incoming)
    return (out,) if incoming is None else (out, *block_run_maps(blocks, layout))


@pytest.mark.parametrize("block_chunks", [1, 2])
def test_blocks_match_one_block(block_chunks):
    """Blocks of 1 and 2 chunks (boundaries inside documents and linked runs) give the outputs, run maps and every
    gradient (inputs and incoming states) of the whole sequence at once, as chunk_maps, scan, chunk_outputs."""
    tensors = inputs(length=300)
    segments = [[Segment(start=0, length=100), Segment(start=100, length=70, linked=True, run=0),
                 Segment(start=170, length=130, linked=True, run=1)],
                [Segment(start=0, length=170, linked=True, run=0), Segment(start=170, length=1, linked=True, run=1),
                 Segment(start=171, length=129)]]
    layout = chunk_layout(segments, 300, run_ends=[[1, 2], [0, 2]])
    incoming = torch.randn(2, 4, 2, 16, 8, dtype=torch.float64, requires_grad=True)
    maps = chunk_maps(*prepare(*tensors, layout))
    result = scan(maps, layout, linking=True)
    whole = (chunk_outputs(maps, result, incoming, layout), *result.run_maps)
    blocked = _blocked(tensors, layout, block_chunks, incoming)
    for got, want in zip(blocked, whole):
        torch.testing.assert_close(got, want, **TOL)
    flat = [torch.cat([x.flatten() for x in outputs]) for outputs in (blocked, whole)]
    for got, want in zip(_grads(flat[0], [*tensors, incoming]), _grads(flat[1], [*tensors, incoming])):
        torch.testing.assert_close(got, want, **TOL)


def _saved_and_backward_bytes(length, dk=64):
    """Bytes the rule keeps for its backward (saved tensors, each storage once) and bytes its backward allocates."""
    tensors = [t.detach().float().requires_grad_() for t in inputs(rows=1, length=length, dk=dk, dv=dk)]
    layout = chunk_layout([[Segment(start=0, length=length)]], length)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = gated_delta_rule(*tensors, layout)
    with BackwardAllocations() as allocated:
        out.square().sum().backward()
    return sum(saved.values()), allocated.bytes


def test_memory_per_token_bounded():
    """Note [Chunked gated delta rule], Blocks: what stays for the backward is the inputs in chunk form (plus one
    state per block), and the backward's allocations grow like the length, not like its square (as a scan that
    indexes one chunk of a whole-sequence tensor per step makes them)."""
    short, long = (_saved_and_backward_bytes(64 * chunks) for chunks in (64, 128))
    inputs_bytes = 64 * 128 * 4 * (2 * 2 * 64 + 4 * 64 + 2 * 4)  # q, k (2 heads), v, g, beta (4 heads), fp32
    assert long[0] < 1.2 * inputs_bytes, (long[0], inputs_bytes)
    assert long[1] < 2.2 * short[1], (short[1], long[1])
