"""The dimensions of a decoder that the memory and time model needs, from an HF config or a named shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from longseq.plan.errors import PlanError


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A dense decoder-only transformer (Llama family) by its dimensions."""

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

    @property
    def attention_width(self) -> int:
        """heads × head_dim: the width of q and of the attention output."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: q, k, v, o projections, the MLP's three, two norms (and q/k norms)."""
        h, a = self.hidden, self.attention_width
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return h * a * 2 + 2 * h * self.kv_width + 3 * h * self.intermediate + norms

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, lm_head (unless tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def with_layers(self, layers: int) -> ModelShape:
        return replace(self, layers=layers)


# Random-weight shapes the benchmarks build (bench/common.py), by their published configs.
SHAPES = {
    "llama-8b": ModelShape(name="llama-8b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                           intermediate=14336, vocab=128256),
    "llama-1b": ModelShape(name="llama-1b", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64,
                           intermediate=8192, vocab=128256, tied_embeddings=True),
    "qwen3-4b": ModelShape(name="qwen3-4b", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128,
                           intermediate=9728, vocab=151936, tied_embeddings=True, qk_norm=True),
}

_QK_NORM_TYPES = ("qwen3", "gemma3", "gemma3_text", "olmo2")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """The shape of an HF config (a PretrainedConfig or its dict)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    text = get("text_config")
    if text is not None:
        return shape_from_config(text, name)
    label = name or get("model_type") or type(config).__name__
    if any(get(key) for key in _MOE_KEYS):
        raise PlanError(f"{label}: mixture-of-experts models are not modelled by longseq plan yet; plan a dense "
                        "decoder (e.g. --shape llama-8b).")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if get(k) is None]
    if missing:
        raise PlanError(f"{label}: the config has no {', '.join(missing)}; pass a decoder's config.json or --shape.")
    heads = get("num_attention_heads")
    return ModelShape(
        name=label, hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
        kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or get("hidden_size") // heads,
        intermediate=get("intermediate_size"), vocab=get("vocab_size"),
        tied_embeddings=bool(get("tie_word_embeddings", False)), qk_norm=get("model_type") in _QK_NORM_TYPES,
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
