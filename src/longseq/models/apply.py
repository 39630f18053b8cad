"""`longseq.apply`: one call that turns a Hugging Face causal LM into a long-sequence one.

Order: the expert blocks of a mixture-of-experts model first (models/moe.py; it also refuses families longseq does
not run exactly, before anything is changed), then sequence-parallel attention (it swaps the attention function),
then the memory features (they wrap MLPs and decoder layers), then the loss entry point on the CausalLM's forward.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from longseq.data.shard import place_documents
from longseq.loss import LossConfig, cross_entropy_sum, global_mean
from longseq.memory import MemoryConfig, apply_memory, lm_head_cross_entropy_sum
from longseq.mesh import Mesh
from longseq.models.anatomy import find_causal_lm, has_attention_sinks
from longseq.models.auto_memory import AutoMemory, install_auto_memory
from longseq.models.moe import apply_experts, new_router_load
from longseq.models.hybrid import apply_linear_attention, refuse_unshardable_mixers
from longseq.parallel.attention import register_attention
from longseq.parallel.attention_op import state_of
from longseq.router_loss import global_router_loss
from longseq.state import LongseqState, attach_state


def apply(model, mesh: Mesh | None = None, memory: MemoryConfig | AutoMemory | str | None = None, *,
          attention: str | None = None, loss: LossConfig | None = None, linear_attention: str = "auto"):
    """Enable sequence parallelism over `mesh` and the `memory` features; returns the same model object.

    memory: a MemoryConfig (those features, always), "auto" or an AutoMemory (the planner's choice for each batch
    shape, Note [Automatic memory]; longseq.memory_config_in_use(model) tells which), or None (none).

    attention: the kernel run on the gathered sequence ('sdpa', 'flash_attention_2', ...); default: the one the
    model was loaded with. 'sdpa' also serves classes that transformers won't load with it (Gemma-2) once their
    attention logit softcapping is off.
    loss: label smoothing and z-loss of the loss (Note [Loss options]); default plain cross-entropy. Per-token
    weights come with the batch, as `shift_loss_weights` shifted like the labels.
    linear_attention: how Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid) run over the sp ranks: 'heads'
    (Ulysses over their heads), 'state' (state passing), or 'auto' (heads where the Ulysses degree splits them);
    see docs/linear-attention.md.

    After this, `longseq.causal_lm_loss(model, longseq.shard_batch(batch, mesh), mesh)` gives the exact global loss,
    and `model(**sharded_batch)` gives this rank's slice of the logits.
    """
    causal = find_causal_lm(model)
    state = attach_state(causal)
    if state.mesh is not None:
        raise RuntimeError("longseq.apply was already called on this model; call it once.")
    mesh = mesh or Mesh()
    if mesh.sp > 1:
        refuse_unshardable_mixers(causal)
    auto = AutoMemory() if memory == "auto" else memory if isinstance(memory, AutoMemory) else None
    if isinstance(memory, str) and auto is None:
        raise ValueError(f"longseq.apply(memory={memory!r}): pass 'auto', an AutoMemory, a MemoryConfig or None.")
    if auto is not None:
        memory = auto.installed()
        install_auto_memory(causal, state, auto)
    routed = apply_experts(causal, state, memory) is not None
    if mesh.sp > 1 or _runs_longseq_attention(causal, memory, attention or causal.config._attn_implementation):
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
    apply_linear_attention(causal, state, mesh, linear_attention)
    if memory is not None:
        apply_memory(causal, memory)
    state.mesh, state.memory, state.loss = mesh, memory, loss
    forward = _make_forward(causal.forward, routed)
    # The class's signature, so that what inspects it (Trainer's column filter, generate's kwargs check) sees the model's.
    functools.update_wrapper(forward, type(causal).forward)
    causal.forward = types.MethodType(forward, causal)
    return model


def _runs_longseq_attention(causal, memory: MemoryConfig | None, implementation: str) -> bool:
    """On one GPU longseq's attention replaces SDPA only where SDPA alone falls short: to keep attention outputs for
    backward (Note [Attention output cache]), and for attention sinks, which transformers' SDPA path ignores
    (Note [Attention sinks]). Every other kernel stays the model's own."""
    caches = memory is not None and memory.offload_checkpoints and memory.cache_attention
    return implementation == "sdpa" and (caches or has_attention_sinks(causal))


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


def _make_forward(original, routed: bool):
    """routed: a mixture-of-experts model (its router loss joins the loss where config.output_router_logits)."""

    def forward(self, *args, shift_labels=None, shift_loss_weights=None, longseq_num_tokens=None, token_mask=None,
                **kwargs):
        """With shift_labels: only the loss (Note [Exact global loss], and for mixture-of-experts models Note [Exact
        router load-balancing loss]); otherwise the model's own forward."""
        if shift_labels is None:
            return original(*args, **kwargs)
        state: LongseqState = self._longseq
        if not args:
            kwargs, per_token = _place_documents(state, kwargs, dict(
                shift_labels=shift_labels, shift_loss_weights=shift_loss_weights, token_mask=token_mask))
            shift_labels, shift_loss_weights, token_mask = (
                per_token.get(name) for name in ("shift_labels", "shift_loss_weights", "token_mask"))
        load = None
        if routed:
            kwargs["output_router_logits"] = False  # transformers would keep every layer's logits; longseq sums
            load = new_router_load(self, token_mask) if self.config.output_router_logits else None
        state.router_load = load
        try:
            hidden = self.get_decoder()(*args, **kwargs)[0]
        finally:
            state.router_load = None
        loss_sum, count = _loss_sum(self, hidden, shift_labels, state, shift_loss_weights)
        loss = global_mean(loss_sum, count, state.mesh, longseq_num_tokens)
        if load is None:
            return CausalLMOutputWithPast(loss=loss)
        aux = global_router_loss(load, state.mesh, count, longseq_num_tokens)
        return MoeCausalLMOutputWithPast(loss=loss + self.config.router_aux_loss_coef * aux, aux_loss=aux)

    return forward


def _place_documents(state: LongseqState, kwargs: dict, per_token: dict) -> tuple[dict, dict]:
    """With a ring, move the batch's tokens to Note [Document placement] (the loss does not depend on which rank
    holds a token): input_ids, position_ids and the loss's per-token inputs (`per_token`; None values are left out).
    Left in zigzag: without a ring, with other per-token inputs (e.g. inputs_embeds), which would have to move too,
    and in linear-attention hybrids, whose state passing follows the zigzag order (parallel/linear_attention.py).
    """
    mesh = state.mesh
    position_ids, input_ids = kwargs.get("position_ids"), kwargs.get("input_ids")
    per_token = {name: value for name, value in per_token.items() if value is not None}
    if (mesh is None or mesh.ring == 1 or state.attention is None or state.linear_attention is not None
            or position_ids is None or input_ids is None):
        return kwargs, per_token
    others = {name for name, value in kwargs.items()
              if isinstance(value, torch.Tensor) and value.shape[:2] == input_ids.shape}
    if others - {"input_ids", "position_ids", "attention_mask"}:
        return kwargs, per_token
    names = ["position_ids", "input_ids", *per_token]
    tokens = [position_ids, input_ids, *per_token.values()]
    if torch.compiler.is_compiling():
        placed = torch.ops.longseq.place_documents(tokens, state.attention)
    else:
        placed = _place(tokens, state)
    placed = dict(zip(names, placed))
    return {**kwargs, "input_ids": placed.pop("input_ids"), "position_ids": placed.pop("position_ids")}, placed


@torch.library.custom_op("longseq::place_documents", mutates_args=())
def _place_documents_op(tokens: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    """(B, s) tensors, position_ids first, moved to Note [Document placement]: one operator, so that compiled code
    sees no data-dependent Python (Note [Attention as one operator]). Records the placed documents for the attention
    of the model whose attention function is `name`."""
    return [t.clone() for t in _place(tokens, state_of(name))]  # an operator's outputs may alias nothing


def _place(tokens: list[torch.Tensor], state: LongseqState) -> list[torch.Tensor]:
    placed, boundaries, layouts = place_documents(tokens, state.mesh)
    state.documents.place(placed[0], boundaries, layouts)
    return placed


@_place_documents_op.register_fake
def _(tokens, name):
    return [torch.empty_like(t) for t in tokens]


def _loss_sum(causal, hidden: torch.Tensor, labels: torch.Tensor, state: LongseqState,
              weights: torch.Tensor | None):
    """Runs inside the CausalLM's forward, so under FSDP2 the lm_head weight is unsharded here."""
    head = causal.get_output_embeddings()
    memory = state.memory
    if memory is not None and memory.tiled_loss and type(head) is torch.nn.Linear:
        return lm_head_cross_entropy_sum(causal, hidden, labels, memory, loss=state.loss, weights=weights)
    softcap = getattr(causal.config, "final_logit_softcapping", None)
    return cross_entropy_sum(hidden, head, labels, softcap, state.loss, weights)
