"""Tiny random-weight decoders of every supported family, and batches for them (shared by the tests)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM,
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=4096)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 48}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM,
               {"head_dim": 16, "sliding_window": 40, "attn_logit_softcapping": None, "final_logit_softcapping": 5.0}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 40,
                                                     "layer_types": ["sliding_attention", "full_attention"]}),
}


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    # Gemma-2's class refuses SDPA only because of attention softcapping, which these configs switch off.
    config._attn_implementation = "eager" if family == "gemma2" else attn
    torch.manual_seed(seed)
    model = model_cls(config).float()
    model.config._attn_implementation = attn
    model.eval()  # no dropout; longseq needs no train-mode switch for exactness tests
    return model


def batch(length: int, rows: int = 1, documents: list[int] | None = None, vocab: int = 128, seed: int = 1) -> dict:
    """input_ids and labels; with `documents` (lengths summing to `length`), position_ids restart per document."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[:, ::7] = -100  # some ignored targets
    out = {"input_ids": input_ids, "labels": labels}
    if documents is not None:
        assert sum(documents) == length
        positions = torch.cat([torch.arange(n) for n in documents])
        out["position_ids"] = torch.stack([positions.roll(r * 3) if r else positions for r in range(rows)])
    return out
