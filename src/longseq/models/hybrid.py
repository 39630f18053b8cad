"""Hybrid decoders: Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid) run through longseq's sequence mixer
(Note [Linear attention under sequence parallelism]); other token mixers that are not attention are refused at
sp > 1, naming what is missing.

The three families differ only in their token-wise parts, read here from the module's attributes:
    qwen3_next   in_proj_qkvz + in_proj_ba (heads interleaved; the model's fix_query_key_value_ordering), norm, out_proj
    qwen3_5      in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, norm, out_proj
    olmo_hybrid  q_proj, k_proj, v_proj, g_proj, b_proj, a_proj, o_norm, o_proj (β × 2 with linear_allow_neg_eigval)
The decoder layers around them pass on keyword arguments they do not know, so each such layer hands its
position_ids to its Gated DeltaNet as `longseq_position_ids` (documents, like the attention's, come from them).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from longseq.mesh import Mesh
from longseq.models.anatomy import decoder_layers
from longseq.parallel.attention import Documents
from longseq.parallel.linear_attention import (
    GatedDeltaNetWeights, LinearPlan, LinearSharding, gated_delta_mix, linear_plan, linear_sharding,
)
from longseq.state import LongseqState

_PADDING = (
    "longseq's Gated DeltaNet layers read documents from position_ids and cannot skip padding (zeros in "
    "attention_mask). Pack rows without padding (position_ids restarting per document) and give padded positions "
    "the label -100; longseq.shard_batch pads that way."
)


class LinearAttention:
    """A model's linear-attention layout and the plan of the forward pass in progress (shared by its layers)."""

    def __init__(self, mesh: Mesh, sharding: LinearSharding, documents: Documents):
        self.mesh, self.sharding, self.documents = mesh, sharding, documents
        self._key, self._plan = None, None

    def plan(self, position_ids: torch.Tensor, rows: int, local_length: int, kernel: int, device) -> LinearPlan:
        """The plan for `rows` rows (position_ids of one row serve them all, as in transformers)."""
        boundaries = self.documents(position_ids)
        if self._key is None or self._key[0] is not boundaries or self._key[1:] != (rows, local_length, kernel):
            per_row = boundaries * rows if len(boundaries) == 1 else boundaries
            self._plan = linear_plan(per_row, self.sharding, local_length, kernel, device)
            self._key = (boundaries, rows, local_length, kernel)
        return self._plan


def gated_delta_nets(model: nn.Module) -> list[nn.Module]:
    """The Gated DeltaNet modules of a model (transformers' `*GatedDeltaNet` classes)."""
    return [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]


def apply_linear_attention(causal, state: LongseqState, mesh: Mesh, mode: str) -> None:
    """Route every Gated DeltaNet layer through longseq's mixer (mode: 'auto', 'heads' or 'state')."""
    nets = gated_delta_nets(causal)
    if not nets:
        return
    first = nets[0]
    sharding = linear_sharding(mesh, mode, first.num_k_heads, first.num_v_heads)
    if state.documents is None:
        state.documents = Documents(mesh)
    linear = LinearAttention(mesh, sharding, state.documents)
    state.linear_attention = linear
    for net in nets:
        _weights(net)  # fails here, at apply time, on a layout it does not know
        net._longseq_inner_forward = net.forward
        net.forward = types.MethodType(_make_forward(linear), net)
    for layer in decoder_layers(causal):
        if any(net in nets for net in layer.children()):
            layer._longseq_linear_inner = layer.forward
            layer.forward = types.MethodType(_layer_forward, layer)


def _layer_forward(self, *args, **kwargs):
    """Hand the layer's position_ids to its Gated DeltaNet, which the layer calls with its other keywords."""
    return self._longseq_linear_inner(*args, longseq_position_ids=kwargs.get("position_ids"), **kwargs)


def _make_forward(linear: LinearAttention):
    def forward(self, hidden_states, cache=None, attention_mask=None, longseq_position_ids=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("cache_params", None)
        if cache is not None:  # generation: transformers' own path keeps the conv and recurrent states
            if linear.mesh.sp > 1:
                raise ValueError("Generation with a cache does not run sequence-parallel; generate with a model that "
                                 "longseq.apply did not shard (or load the trained weights into a plain one).")
            return self._longseq_inner_forward(hidden_states, cache, attention_mask, **kwargs)
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError(_PADDING)
        q, k, v, z, b, a = _projections(self, hidden_states)
        weights = _weights(self)
        local = hidden_states.shape[1] * linear.sharding.heads_degree
        plan = linear.plan(longseq_position_ids, hidden_states.shape[0], local, weights.conv_weight.shape[-1],
                           hidden_states.device)
        core = gated_delta_mix(linear.sharding, plan, q, k, v, b, a, weights)
        return _output(self, core, z)

    return forward


def _weights(net: nn.Module) -> GatedDeltaNetWeights:
    """The mixer's view of a Gated DeltaNet module."""
    missing = [name for name in ("conv1d", "A_log", "dt_bias", "num_k_heads", "head_k_dim", "head_v_dim")
               if not hasattr(net, name)]
    if missing or _layout(net) is None:
        raise ValueError(
            f"longseq does not know the layout of {type(net).__name__} (missing {missing or 'known projections'}); "
            "it knows transformers' Qwen3-Next, Qwen3.5 and OLMo-Hybrid Gated DeltaNet layers. Run this model with "
            "sp=1."
        )
    return GatedDeltaNetWeights(
        num_k_heads=net.num_k_heads, head_k_dim=net.head_k_dim, head_v_dim=net.head_v_dim,
        conv_weight=net.conv1d.weight.squeeze(1), conv_bias=net.conv1d.bias, activation=net.activation,
        A_log=net.A_log, dt_bias=net.dt_bias, beta_scale=2.0 if getattr(net, "allow_neg_eigval", False) else 1.0,
    )


def _layout(net: nn.Module) -> str | None:
    if hasattr(net, "in_proj_qkvz") and hasattr(net, "fix_query_key_value_ordering"):
        return "qwen3_next"
    if all(hasattr(net, n) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")):
        return "qwen3_5"
    if all(hasattr(net, n) for n in ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")):
        return "olmo_hybrid"
    return None


def _projections(net: nn.Module, hidden: torch.Tensor):
    """q, k (B, s, Hk, dk), v and the output gate z (B, s, Hv, dv), raw gates b, a (B, s, Hv), as the model has
    them before its convolution."""
    rows, length = hidden.shape[:2]
    dk, dv = net.head_k_dim, net.head_v_dim
    layout = _layout(net)
    if layout == "qwen3_next":
        return net.fix_query_key_value_ordering(net.in_proj_qkvz(hidden), net.in_proj_ba(hidden))
    if layout == "qwen3_5":
        q, k, v = net.in_proj_qkv(hidden).split([net.key_dim, net.key_dim, net.value_dim], dim=-1)
        z, b, a = net.in_proj_z(hidden), net.in_proj_b(hidden), net.in_proj_a(hidden)
    else:
        q, k, v = net.q_proj(hidden), net.k_proj(hidden), net.v_proj(hidden)
        z, b, a = net.g_proj(hidden), net.b_proj(hidden), net.a_proj(hidden)
    heads = (rows, length, -1)
    return (q.view(*heads, dk), k.view(*heads, dk), v.view(*heads, dv), z.view(*heads, dv), b, a)


def _output(net: nn.Module, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The gated norm per value head and the output projection, as the model computes them."""
    norm = net.norm if hasattr(net, "norm") else net.o_norm
    projection = net.out_proj if hasattr(net, "out_proj") else net.o_proj
    rows, length, _, dv = core.shape
    out = norm(core.reshape(-1, dv), z.reshape(-1, dv)).reshape(rows, length, -1)
    return projection(out)


def refuse_unshardable_mixers(causal) -> None:
    """Refuse token mixers besides attention and Gated DeltaNet (for sp > 1): a depthwise (causal) convolution over
    the sequence, or a layer type that is neither attention nor linear attention."""
    nets = gated_delta_nets(causal)
    inside = {id(m) for net in nets for m in net.modules()}
    for name, module in causal.named_modules():
        if (isinstance(module, nn.Conv1d) and id(module) not in inside and module.groups == module.in_channels
                and module.kernel_size[0] > 1):
            owner = name.rsplit(".", 1)[0]
            raise ValueError(
                f"longseq cannot run {type(causal).__name__} sequence-parallel exactly: {owner} "
                f"({type(causal.get_submodule(owner)).__name__}) mixes tokens along the sequence (a causal "
                "convolution, and a recurrence or scan) in a way longseq has no sharded form of; longseq shards "
                "attention and Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid). Run it with sp=1."
            )
    known = {"full_attention", "sliding_attention", "chunked_attention", "linear_attention"}
    layer_types = set(getattr(causal.config, "layer_types", None) or []) - known
    if layer_types or (not nets and "linear_attention" in set(getattr(causal.config, "layer_types", None) or [])):
        raise ValueError(
            f"longseq cannot run {type(causal).__name__} sequence-parallel exactly: its layer types "
            f"{sorted(layer_types or {'linear_attention'})} are not attention, and longseq shards only attention and "
            "Gated DeltaNet layers. Run it with sp=1."
        )
