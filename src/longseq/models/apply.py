"""`longseq.apply`: one call that turns a Hugging Face causal LM into a long-sequence one.

Order: sequence-parallel attention first (it swaps the attention function), then the memory features (they wrap
MLPs and decoder layers), then the loss entry point on the CausalLM's forward.
"""

from __future__ import annotations

import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from longseq.data.shard import place_documents
from longseq.loss import cross_entropy_sum, global_mean
from longseq.memory import MemoryConfig, apply_memory, lm_head_cross_entropy_sum
from longseq.mesh import Mesh
from longseq.models.anatomy import find_causal_lm
from longseq.parallel.attention import register_attention
from longseq.parallel.attention_op import state_of
from longseq.state import LongseqState, attach_state


def apply(model, mesh: Mesh | None = None, memory: MemoryConfig | None = None, *, attention: str | None = None):
    """Enable sequence parallelism over `mesh` and the `memory` features; returns the same model object.

    attention: the kernel run on the gathered sequence ('sdpa', 'flash_attention_2', ...); default: the one the
    model was loaded with. 'sdpa' also serves classes that transformers won't load with it (Gemma-2) once their
    attention logit softcapping is off.

    After this, `longseq.causal_lm_loss(model, longseq.shard_batch(batch, mesh), mesh)` gives the exact global loss,
    and `model(**sharded_batch)` gives this rank's slice of the logits.
    """
    causal = find_causal_lm(model)
    state = attach_state(causal)
    if state.mesh is not None:
        raise RuntimeError("longseq.apply was already called on this model; call it once.")
    mesh = mesh or Mesh()
    if mesh.sp > 1 or _caches_attention(memory, attention or causal.config._attn_implementation):
        config = causal.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(
                f"attn_logit_softcapping={config.attn_logit_softcapping} cannot run on longseq's SDPA kernels; set "
                "config.attn_logit_softcapping = None before longseq.apply."
            )
        implementation = attention or config._attn_implementation
        causal.set_attn_implementation(register_attention(state, mesh, implementation, heads, kv_heads))
        causal.register_forward_pre_hook(_refuse_padding, with_kwargs=True)
        if mesh.sp > 1:
            causal.register_forward_pre_hook(_require_position_ids, with_kwargs=True)
    if memory is not None:
        apply_memory(causal, memory)
    state.mesh, state.memory = mesh, memory
    causal.forward = types.MethodType(_make_forward(causal.forward), causal)
    return model


def _caches_attention(memory: MemoryConfig | None, implementation: str) -> bool:
    """On one GPU longseq's attention is only needed to keep attention outputs for backward (Note [Attention output
    cache]); it replaces SDPA, and every other kernel stays the model's own."""
    return (memory is not None and memory.offload_checkpoints and memory.cache_attention
            and implementation == "sdpa")


def _refuse_padding(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError(
            "longseq's attention reads documents from position_ids and ignores attention_mask, and this batch has "
            "padding (zeros in attention_mask). Pack rows without padding (position_ids restarting per document) "
            "and give padded positions the label -100; longseq.shard_batch pads that way."
        )


def _require_position_ids(module, args, kwargs):
    if kwargs.get("position_ids") is None:
        raise ValueError(
            "This model runs sequence-parallel, so it needs position_ids (global positions of this rank's tokens). "
            "Pass the batch through longseq.shard_batch and call model(**sharded_batch) with keyword arguments."
        )


def _make_forward(original):
    def forward(self, *args, shift_labels=None, longseq_num_tokens=None, **kwargs):
        """With shift_labels: only the loss (Note [Exact global loss]); otherwise the model's own forward."""
        if shift_labels is None:
            return original(*args, **kwargs)
        state: LongseqState = self._longseq
        if not args:
            kwargs, shift_labels = _place_documents(state, kwargs, shift_labels)
        hidden = self.get_decoder()(*args, **kwargs)[0]
        loss_sum, count = _loss_sum(self, hidden, shift_labels, state.memory)
        return CausalLMOutputWithPast(loss=global_mean(loss_sum, count, state.mesh, longseq_num_tokens))

    return forward


def _place_documents(state: LongseqState, kwargs: dict, shift_labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """With a ring, move the batch's tokens to Note [Document placement] (the loss does not depend on which rank
    holds a token). Left in zigzag: without a ring, or with other per-token inputs than input_ids and position_ids
    (e.g. inputs_embeds), which would have to move too."""
    mesh = state.mesh
    position_ids, input_ids = kwargs.get("position_ids"), kwargs.get("input_ids")
    if mesh is None or mesh.ring == 1 or state.documents is None or position_ids is None or input_ids is None:
        return kwargs, shift_labels
    per_token = {name for name, value in kwargs.items()
                 if isinstance(value, torch.Tensor) and value.shape[:2] == input_ids.shape}
    if per_token - {"input_ids", "position_ids", "attention_mask"}:
        return kwargs, shift_labels
    input_ids, position_ids, shift_labels = torch.ops.longseq.place_documents(input_ids, position_ids, shift_labels,
                                                                               state.attention)
    return {**kwargs, "input_ids": input_ids, "position_ids": position_ids}, shift_labels


@torch.library.custom_op("longseq::place_documents", mutates_args=())
def _place_documents_op(input_ids: torch.Tensor, position_ids: torch.Tensor, shift_labels: torch.Tensor,
                        name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One operator, so that compiled code sees no data-dependent Python (Note [Attention as one operator]); records
    the placed documents for the attention of the model whose attention function is `name`."""
    state = state_of(name)
    tokens = {"input_ids": input_ids, "position_ids": position_ids, "shift_labels": shift_labels}
    placed, boundaries, layouts = place_documents(tokens, state.mesh)
    placed = {key: value.clone() for key, value in placed.items()}  # an operator's outputs may alias nothing
    state.documents.place(placed["position_ids"], boundaries, layouts)
    return placed["input_ids"], placed["position_ids"], placed["shift_labels"]


@_place_documents_op.register_fake
def _(input_ids, position_ids, shift_labels, name):
    return torch.empty_like(input_ids), torch.empty_like(position_ids), torch.empty_like(shift_labels)


def _loss_sum(causal, hidden: torch.Tensor, labels: torch.Tensor, memory: MemoryConfig | None):
    """Runs inside the CausalLM's forward, so under FSDP2 the lm_head weight is unsharded here."""
    head = causal.get_output_embeddings()
    if memory is not None and memory.tiled_loss and type(head) is torch.nn.Linear:
        return lm_head_cross_entropy_sum(causal, hidden, labels, memory)
    return cross_entropy_sum(hidden, head, labels, getattr(causal.config, "final_logit_softcapping", None))
