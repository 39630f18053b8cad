"""What a plan needs of decoders beyond a dense Llama: mixture-of-experts blocks, Gated DeltaNet layers, sliding
windows and attention sinks, read from the HF config of the families longseq runs (docs/models.md).

    family                 layers                                      experts (per token: top-k of E)
    qwen3_moe              attention; experts but mlp_only_layers      tiled by longseq (models/moe.py)
    mixtral                attention (sliding_window if set); experts  tiled by longseq
    gpt_oss                sliding and full attention alternating,     tiled by longseq; biases
                           attention sinks; experts
    qwen3_next             linear and full attention (layer_types),    as the model runs them (untiled), with a
                           gated attention output; experts but          shared expert
                           mlp_only_layers
    qwen3_5(_moe)_text     as qwen3_next; every layer has experts in    as qwen3_next
                           the MoE variant
    olmo_hybrid            linear and full attention                   none (dense)

A config with experts of another family is refused (PlanError naming the fix), as is an unknown layer type.
"""

from __future__ import annotations

from dataclasses import dataclass

from longseq.plan.errors import PlanError

TILED_EXPERTS = ("qwen3_moe", "mixtral", "gpt_oss")
"""Families whose expert blocks longseq runs over sequence tiles (models/moe.FAMILIES)."""
_UNTILED_EXPERTS = ("qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe")
_GATED_ATTENTION = ("qwen3_next", "qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_MIXERS = {"full_attention": "attention", "sliding_attention": "sliding", "linear_attention": "linear"}
_FIX = "plan it with --shape, or run it with an explicit memory configuration (`memory.auto: false`, or " \
       "longseq.apply(model, mesh, longseq.MemoryConfig(...)))"


@dataclass(frozen=True)
class LayerKind:
    """What one decoder layer is made of: its token mixer and its feed-forward block."""

    mixer: str = "attention"
    """'attention' (full causal), 'sliding' (attention within a sliding window) or 'linear' (Gated DeltaNet)."""
    ffn: str = "dense"
    """'dense' (a gated MLP of intermediate_size) or 'experts' (a mixture-of-experts block)."""


DENSE = LayerKind()


@dataclass(frozen=True, kw_only=True)
class ExpertShape:
    """A mixture-of-experts block: a router over `experts` gated MLPs, each token through `top_k` of them."""

    experts: int
    """E: routed experts per block (num_experts / num_local_experts)."""
    top_k: int
    """Experts each token goes through (num_experts_per_tok)."""
    intermediate: int
    """One expert's intermediate width (moe_intermediate_size, or intermediate_size for Mixtral and GPT-OSS)."""
    shared_intermediate: int = 0
    """Width of the shared expert every token goes through, behind a sigmoid gate (Qwen3-Next, Qwen3.5); 0: none."""
    bias: bool = False
    """Biases on the experts' projections and the router (GPT-OSS)."""
    gate_tensors: int = 2
    """I-wide tensors the experts' activation keeps per routed row besides the gate and up projections: act(gate)
    and the product for a SiLU-gated expert; five for GPT-OSS's clamped GLU (both clamps' results, the sigmoid, the
    GLU, up + 1 and the product, less the clamped up, which nothing keeps)."""
    activation_elements: int = 5
    """I-wide elements the activation reads and writes per routed row (Note [Expert block time]): act(gate) and its
    product with up, 5; GPT-OSS's clamped GLU (seven ops on the strided halves of gate_up), 16."""
    tiled: bool = True
    """longseq runs the block over sequence tiles (Note [Tiled experts]); False: as the model has it."""
    router_loss: bool = False
    """config.output_router_logits: the router's load-balancing statistics are computed (longseq's RouterLoad)."""

    def params(self, hidden: int) -> int:
        """Parameters of one block: every expert, the router, the shared expert and its gate."""
        experts = self.experts * 3 * hidden * self.intermediate
        router = self.experts * hidden
        if self.bias:
            experts += self.experts * (2 * self.intermediate + hidden)
            router += self.experts
        shared = 3 * hidden * self.shared_intermediate + hidden if self.shared_intermediate else 0
        return experts + router + shared


@dataclass(frozen=True, kw_only=True)
class LinearShape:
    """A Gated DeltaNet layer (parallel/linear_attention.py) by its dimensions."""

    k_heads: int
    """linear_num_key_heads."""
    v_heads: int
    """linear_num_value_heads (a multiple of the key heads)."""
    k_dim: int
    """linear_key_head_dim."""
    v_dim: int
    """linear_value_head_dim."""
    kernel: int = 4
    """linear_conv_kernel_dim: the depthwise causal convolution's width."""
    interleaved: bool = False
    """q, k, v and z come out of one projection interleaved per key head (Qwen3-Next): v and z are copied out."""

    @property
    def key_width(self) -> int:
        return self.k_heads * self.k_dim

    @property
    def value_width(self) -> int:
        return self.v_heads * self.v_dim

    @property
    def conv_width(self) -> int:
        """Channels of the convolution: q, k and v."""
        return 2 * self.key_width + self.value_width

    def params(self, hidden: int) -> int:
        """Projections to q, k, v, the output gate z and the gates b, a; the convolution; A_log, dt_bias; the gated
        norm; the output projection."""
        projections = hidden * (self.conv_width + self.value_width + 2 * self.v_heads)
        return projections + self.conv_width * self.kernel + 2 * self.v_heads + self.v_dim + self.value_width * hidden


def family_fields(get, label: str) -> dict:
    """ModelShape fields beyond the dense ones: layer kinds, experts, linear attention, window, sinks, gate."""
    model_type = get("model_type")
    fields = {}
    experts = _experts(get, model_type, label)
    if experts is not None:
        fields["experts"] = experts
    if get("linear_num_value_heads") is not None and "linear_attention" in (get("layer_types") or []):
        fields["linear"] = LinearShape(k_heads=get("linear_num_key_heads"), v_heads=get("linear_num_value_heads"),
                                       k_dim=get("linear_key_head_dim"), v_dim=get("linear_value_head_dim"),
                                       kernel=get("linear_conv_kernel_dim") or 4,
                                       interleaved=model_type == "qwen3_next")
    kinds = _layer_kinds(get, model_type, experts, label)
    if any(kind != DENSE for kind in kinds):
        fields["layer_kinds"] = kinds
    if any(kind.mixer == "sliding" for kind in kinds):
        fields["sliding_window"] = get("sliding_window")
    fields["sinks"] = model_type == "gpt_oss"
    fields.update(_rotary(get, model_type))
    fields["attention_gate"] = model_type in _GATED_ATTENTION
    fields["attention_bias"] = bool(get("attention_bias", False))
    return fields


def _rotary(get, model_type: str | None) -> dict:
    """GPT-OSS rotates halves with cos and sin of half the head's width; a partial rotary (Qwen3-Next, Qwen3.5)
    rotates a share of it. Both run the model's own rotary function (memory/rotary.py replaces only the standard
    full-width form)."""
    head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
    partial = get("partial_rotary_factor") or (get("rope_parameters") or {}).get("partial_rotary_factor")
    if model_type == "gpt_oss":
        return {"rotary_width": head_dim // 2, "lean_rotary": False}
    if partial and partial < 1:
        return {"rotary_width": int(head_dim * partial), "lean_rotary": False}
    return {}


def _experts(get, model_type: str | None, label: str) -> ExpertShape | None:
    count = next((get(key) for key in _MOE_KEYS if get(key)), None)
    if not count:
        return None
    if model_type not in TILED_EXPERTS + _UNTILED_EXPERTS:
        raise PlanError(f"{label}: longseq plan models the mixture-of-experts blocks of "
                        f"{', '.join(TILED_EXPERTS + _UNTILED_EXPERTS)}, not of {model_type!r}; {_FIX}.")
    intermediate = get("moe_intermediate_size") if get("moe_intermediate_size") else get("intermediate_size")
    return ExpertShape(experts=count, top_k=get("num_experts_per_tok"), intermediate=intermediate,
                       shared_intermediate=get("shared_expert_intermediate_size") or 0, bias=model_type == "gpt_oss",
                       gate_tensors=5 if model_type == "gpt_oss" else 2,
                       activation_elements=16 if model_type == "gpt_oss" else 5,
                       tiled=model_type in TILED_EXPERTS, router_loss=bool(get("output_router_logits", False)))


def _layer_kinds(get, model_type: str | None, experts: ExpertShape | None, label: str) -> tuple[LayerKind, ...]:
    layers = get("num_hidden_layers")
    types = list(get("layer_types") or [])
    if not types:
        window = get("sliding_window") if get("use_sliding_window", True) else None
        types = ["sliding_attention" if window else "full_attention"] * layers
    unknown = sorted(set(types) - set(_MIXERS))
    if unknown:
        raise PlanError(f"{label}: layer types {unknown} are not modelled by longseq plan (it knows "
                        f"{', '.join(_MIXERS)}); {_FIX}.")
    only_dense = set(get("mlp_only_layers") or [])
    step = get("decoder_sparse_step") or 1
    kinds = []
    for i in range(layers):
        sparse = experts is not None and i not in only_dense and (i + 1) % step == 0
        kinds.append(LayerKind(mixer=_MIXERS[types[i % len(types)]], ffn="experts" if sparse else "dense"))
    return tuple(kinds)
