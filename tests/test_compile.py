"""torch.compile(model) on a model longseq prepared: the same loss and gradients as eager, at sp = 1 and sp = 2
(Ulysses and ring, packed rows); fullgraph where Note [Attention as one operator] says it holds, and no recompile
when the documents of the next batch differ.

Run: PYTHONPATH=src python -m pytest -q tests/test_compile.py
"""

from __future__ import annotations

import copy

import torch

import longseq
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


def test_one_process_with_memory_features():
    """Checkpoint offload (graph breaks at its saved-tensor hooks), the attention cache, tiled MLP and loss."""
    _compare(longseq.Mesh(), longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0), fullgraph=False)


def _sp2(ring: int) -> None:
    mesh = longseq.init_mesh(sp=2, ring=ring)
    _compare(mesh, None, fullgraph=True)
    if ring > 1:
        _compare(mesh, longseq.MemoryConfig(tile_tokens=16, offload_min_bytes=0), fullgraph=False)


def test_ulysses_fullgraph():
    run_distributed(_sp2, 2, 1)


def test_ring_fullgraph_and_with_memory_features():
    run_distributed(_sp2, 2, 2)
