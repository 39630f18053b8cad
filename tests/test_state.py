"""state.py: everything longseq keeps on a model is one LongseqState, in one attribute."""

from __future__ import annotations

import pytest

import longseq
from longseq.memory import MemoryConfig, apply_checkpoint_offload
from longseq.state import longseq_state
from tests.models import tiny_model


def test_apply_keeps_one_state_object():
    mesh, memory = longseq.Mesh(), MemoryConfig(expandable_segments=False)
    model = longseq.apply(tiny_model(), mesh, memory)
    assert [name for name in vars(model) if name.startswith("_longseq")] == ["_longseq"]
    state = longseq_state(model)
    assert state.mesh is mesh and state.memory is memory
    assert state.attention == model.config._attn_implementation and state.documents.mesh is mesh
    assert state.offloader is not None and state.attention_cache is None
    with pytest.raises(RuntimeError, match="once"):
        longseq.apply(model, mesh, memory)


def test_memory_features_alone_attach_a_state_without_a_mesh():
    model = apply_checkpoint_offload(tiny_model(), MemoryConfig())
    state = longseq_state(model)
    assert state.mesh is None and state.attention is None and state.offloader is not None
    assert longseq_state(tiny_model()) is None
