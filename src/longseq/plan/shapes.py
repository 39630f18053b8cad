"""The dimensions of a decoder that the memory and time model needs, from an HF config or a named shape."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from longseq.plan.errors import PlanError
from longseq.plan.families import DENSE, ExpertShape, LayerKind, LinearShape, family_fields


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A decoder-only transformer by its dimensions: a dense Llama-family decoder, or one whose layers differ
    (mixture-of-experts blocks, Gated DeltaNet layers, sliding windows; plan/families.py)."""

    name: str
    """What the shape was read from (a named shape, a path or a config class)."""
    hidden: int
    """hidden_size: the residual stream's width."""
    layers: int
    """num_hidden_layers."""
    heads: int
    """num_attention_heads (query heads)."""
    kv_heads: int
    """num_key_value_heads (GQA: fewer than heads)."""
    head_dim: int
    """Width of one head (often hidden / heads; Qwen3 sets it apart)."""
    intermediate: int
    """intermediate_size: the MLP's inner width (gate, up and down projections)."""
    vocab: int
    """vocab_size: the width of the logits."""
    tied_embeddings: bool = False
    """The lm_head shares the embedding matrix."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Qwen3): they keep fp32 copies for backward (not tiled)."""
    qk_norm_full_width: bool = False
    """The q/k norms' weights span all heads (OLMo-2's, OLMo-Hybrid's) rather than one head."""
    layer_kinds: tuple[LayerKind, ...] = ()
    """Each layer's token mixer and feed-forward block; empty: every layer full attention and a dense MLP."""
    experts: ExpertShape | None = None
    """The mixture-of-experts block of the layers whose kind says 'experts'."""
    linear: LinearShape | None = None
    """The Gated DeltaNet of the layers whose kind says 'linear'."""
    sliding_window: int | None = None
    """Tokens a 'sliding' layer's query sees (itself included)."""
    sinks: bool = False
    """Attention sinks (GPT-OSS): longseq's block kernels run every attention layer."""
    attention_gate: bool = False
    """The attention output is gated by a sigmoid of a second q-wide projection (Qwen3-Next, Qwen3.5)."""
    attention_bias: bool = False
    """Biases on q, k, v and o projections (GPT-OSS)."""
    rotary_width: int | None = None
    """Width of the rotary cos and sin per token (None: head_dim; GPT-OSS's are half as wide, a partial rotary's
    narrower)."""
    lean_rotary: bool = True
    """longseq's lean rotary backward replaces the model's (memory/rotary.py): a standard, full-width rotary."""

    @property
    def attention_width(self) -> int:
        """heads × head_dim: the width of q and of the attention output."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def kinds(self) -> tuple[LayerKind, ...]:
        """Each layer's kind (DENSE for every layer of a dense decoder)."""
        return self.layer_kinds or (DENSE,) * self.layers

    def kind_params(self, kind: LayerKind) -> int:
        """Parameters of one decoder layer of `kind`: its mixer, its feed-forward block and two norms."""
        h, a = self.hidden, self.attention_width
        if kind.mixer == "linear":
            mixer = self.linear.params(h)
        else:
            q = a * (2 if self.attention_gate else 1)
            norms = (a + self.kv_width if self.qk_norm_full_width else 2 * self.head_dim) if self.qk_norm else 0
            mixer = h * (q + 2 * self.kv_width) + a * h + norms
            mixer += (q + 2 * self.kv_width + h if self.attention_bias else 0) + (self.heads if self.sinks else 0)
        ffn = self.experts.params(h) if kind.ffn == "experts" else 3 * h * self.intermediate
        return mixer + ffn + 2 * h

    @cached_property
    def layer_params(self) -> int:
        """Parameters of the largest decoder layer (what FSDP2 gathers at once): q, k, v, o projections (or a Gated
        DeltaNet), the MLP's three (or every expert and the router), two norms (and q/k norms)."""
        return max(self.kind_params(kind) for kind in set(self.kinds))

    def params_of_layers(self, first: int, stop: int) -> int:
        """Parameters of decoder layers first .. stop − 1."""
        return self._params_before[stop] - self._params_before[first]

    @cached_property
    def _params_before(self) -> tuple[int, ...]:
        """Parameters of the decoder layers before layer i, for i = 0 .. layers (the planner asks for these sums for
        every layer of every candidate)."""
        return tuple(itertools.accumulate((self.kind_params(kind) for kind in self.kinds), initial=0))

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, lm_head (unless tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @cached_property
    def params(self) -> int:
        return self.params_of_layers(0, self.layers) + self.root_params

    @property
    def active_params(self) -> int:
        """Parameters a token goes through: of an expert block, the router, the shared expert and top_k experts."""
        if self.experts is None:
            return self.params
        idle = (self.experts.experts - self.experts.top_k) * 3 * self.hidden * self.experts.intermediate
        return self.params - idle * sum(kind.ffn == "experts" for kind in self.kinds)

    def layer_summary(self) -> str:
        """The layers by kind, e.g. '36 Gated DeltaNet, 12 attention; 48 with experts (512, top 10)'."""
        mixers = {"attention": "attention", "sliding": "sliding-window attention", "linear": "Gated DeltaNet"}
        counts = [f"{sum(k.mixer == m for k in self.kinds)} {name}" for m, name in mixers.items()
                  if any(k.mixer == m for k in self.kinds)]
        experts = sum(k.ffn == "experts" for k in self.kinds)
        if experts:
            shared = f", shared {self.experts.shared_intermediate}" if self.experts.shared_intermediate else ""
            counts[-1] += f"; {experts} with experts ({self.experts.experts}, top {self.experts.top_k}{shared})"
        return ", ".join(counts)

    def with_layers(self, layers: int) -> ModelShape:
        """The same decoder with `layers` layers, their kinds repeating the pattern of the first ones."""
        kinds = tuple(self.layer_kinds[i % len(self.layer_kinds)] for i in range(layers)) if self.layer_kinds else ()
        return replace(self, layers=layers, layer_kinds=kinds)


# Random-weight shapes the benchmarks build (bench/common.py), by their published configs.
SHAPES = {
    "llama-8b": ModelShape(name="llama-8b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                           intermediate=14336, vocab=128256),
    "llama-1b": ModelShape(name="llama-1b", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64,
                           intermediate=8192, vocab=128256, tied_embeddings=True),
    "qwen3-4b": ModelShape(name="qwen3-4b", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128,
                           intermediate=9728, vocab=151936, tied_embeddings=True, qk_norm=True),
}

_QK_NORM_TYPES = ("qwen3", "gemma3", "gemma3_text", "olmo2", "qwen3_moe", "qwen3_next", "qwen3_5_text",
                  "qwen3_5_moe_text", "olmo_hybrid")


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """The shape of an HF config (a PretrainedConfig or its dict)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    text = get("text_config")
    if text is not None:
        return shape_from_config(text, name)
    label = name or get("model_type") or type(config).__name__
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if get(k) is None]
    if missing:
        raise PlanError(f"{label}: the config has no {', '.join(missing)}; pass a decoder's config.json or --shape.")
    heads = get("num_attention_heads")
    fields = family_fields(get, label)
    if get("intermediate_size") is None and any(kind.ffn == "dense" for kind in fields.get("layer_kinds", (DENSE,))):
        raise PlanError(f"{label}: the config has no intermediate_size; pass a decoder's config.json or --shape.")
    return ModelShape(
        name=label, hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
        kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or get("hidden_size") // heads,
        intermediate=get("intermediate_size") or 0, vocab=get("vocab_size"),
        tied_embeddings=bool(get("tie_word_embeddings", False)), qk_norm=get("model_type") in _QK_NORM_TYPES,
        qk_norm_full_width=get("model_type") in ("olmo2", "olmo_hybrid"), **fields,
    )


def load_shape(model: str) -> ModelShape:
    """A named shape (llama-8b, llama-1b, qwen3-4b), a config.json, a model directory, or a Hub id (through
    transformers' AutoConfig, which may need the network)."""
    if model in SHAPES:
        return SHAPES[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return shape_from_config(json.loads(path.read_text()), name=model)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise PlanError(f"--model {model!r} is neither a named shape ({', '.join(SHAPES)}), a config.json, a model "
                        f"directory, nor a config transformers could load ({error.__class__.__name__}).") from None
    return shape_from_config(config, name=model)
