"""torch.compile(model) on a model longseq prepared: the same loss and gradients as eager, at sp = 1 and sp = 2
(Ulysses and ring, packed rows); fullgraph where Note [Attention as one operator] says it holds, and no recompile
when the documents of the next batch differ.

Run: PYTHONPATH=src python -m pytest -q tests/test_compile.py
"""

from __future__ import annotations

import copy

import torch

import longseq
from longseq.memory.attention_cache import KeptAttention
from longseq.parallel import varlen
from longseq.parallel.attention import Documents
from longseq.parallel.attention_op import block_attention, register_state
from longseq.parallel.head_groups import HeadGroups
from longseq.state import LongseqState
from tests.distributed import run_distributed
from tests.models import batch, tiny_model

TOL = dict(atol=1e-5, rtol=1e-4)
PACKED = dict(length=64, rows=2, documents=[10, 30, 24])
REPACKED = dict(length=64, rows=2, documents=[3, 40, 21], seed=3)


def _step(model, mesh, data, compiled=None):
    model.zero_grad()
    loss = longseq.causal_lm_loss(model if compiled is None else compiled, longseq.shard_batch(data, mesh), mesh)
    loss.backward()
    longseq.sync_gradients(model, mesh)
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _compare(mesh, memory, fullgraph: bool) -> None:
    eager, compiled = tiny_model("llama"), tiny_model("llama")
    for model in (eager, compiled):
        longseq.apply(model, mesh, copy.deepcopy(memory))
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=fullgraph)
    for case in (PACKED, REPACKED):
        want_loss, want = _step(eager, mesh, batch(**case))
        got_loss, got = _step(compiled, mesh, batch(**case), fn)
        torch.testing.assert_close(got_loss, want_loss, **TOL)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{name}: {m}")
        torch._dynamo.config.error_on_recompile = fullgraph  # the second packing must reuse the graph
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def test_one_process_with_memory_features(monkeypatch):
    """Checkpoint offload (graph breaks at its saved-tensor hooks), the attention cache, tiled MLP and loss, one head
    per kernel call. The operators carry the head groups, and the cache hears of each attention backward as in eager
    runs (its prefetch after the attention, Note [Checkpoint offload])."""
    sizes, done = [], []
    real_backward, real_done = varlen.block_backward, KeptAttention.backward_done
    monkeypatch.setattr(varlen, "block_backward", lambda *a, groups, **k: sizes.append(groups.size(a[1], a[2]))
                        or real_backward(*a, groups=groups, **k))
    monkeypatch.setattr(KeptAttention, "backward_done", lambda self: done.append(self.index) or real_done(self))
    memory = longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0, attention_heads_per_call=1)
    _compare(longseq.Mesh(), memory, fullgraph=False)
    layers = tiny_model("llama").config.num_hidden_layers
    assert set(sizes) == {1}
    assert sorted(done) == sorted(list(range(layers)) * 4)  # every layer, in 2 eager and 2 compiled steps


def _sp2(ring: int) -> None:
    mesh = longseq.init_mesh(sp=2, ring=ring)
    _compare(mesh, None, fullgraph=True)
    if ring > 1:
        _compare(mesh, longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0), fullgraph=False)


def test_ulysses_fullgraph():
    run_distributed(_sp2, 2, 1)


def test_ring_fullgraph_and_with_memory_features():
    run_distributed(_sp2, 2, 2)


class _Cache:
    """An attention cache that computes, and counts the calls of backward_done."""

    def __init__(self):
        self.done = 0

    def __call__(self, compute):
        return compute()

    def backward_done(self):
        self.done += 1


def test_operator_calls_the_caches_backward_done_and_takes_head_groups(monkeypatch):
    """Compiled, the attention operator files the cache's backward_done and calls it once per backward, and runs the
    kernels over the head groups it is given (packed rows, GQA)."""
    state = LongseqState()
    state.documents, state.attention_cache = Documents(longseq.Mesh()), _Cache()
    register_state("test_compile_op", state)
    sizes, real = [], varlen.block_backward
    monkeypatch.setattr(varlen, "block_backward",
                        lambda *a, groups, **k: sizes.append(groups.size(a[1], a[2])) or real(*a, groups=groups, **k))
    position_ids = torch.cat([torch.arange(10), torch.arange(22)])[None].repeat(2, 1)
    q = torch.randn(2, 4, 32, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 32, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def attend(q, k, v, groups):
        return block_attention(q, k, v, position_ids, name="test_compile_op", scale=0.3, kernel="sdpa",
                               groups=groups)

    # q * 1: an intermediate, as in a model (ring_attention's eager hook would stay on the leaf q)
    want = torch.autograd.grad(attend(q * 1, k, v, HeadGroups()).square().sum(), (q, k, v))
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    for step in (1, 2):
        got = torch.autograd.grad(compiled(q, k, v, HeadGroups(heads=1)).square().sum(), (q, k, v))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert state.attention_cache.done == 1 + step  # the eager call's hook, then once per compiled backward
    assert set(sizes[-4:]) == {1}
    torch._dynamo.reset()
