"""Tiny HF causal LMs with random weights, for exactness tests against the untouched model."""

from __future__ import annotations

import torch
import transformers

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, head_dim=16, initializer_range=0.1,
)
FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config = getattr(transformers, FAMILIES[family])(**{**SMALL, **overrides})
    attention = "eager" if family == "gemma2" else "sdpa"  # transformers refuses sdpa with Gemma-2's softcapping
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return model.train()


def assert_grads_equal(reference: torch.nn.Module, model: torch.nn.Module, **tolerances) -> None:
    """Every trainable parameter has a gradient, equal to the reference's (tolerances relative to its size)."""
    ref = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert ref.keys() == got.keys() and ref
    for name, p in ref.items():
        assert p.grad is not None and got[name].grad is not None, name
        scale = p.grad.abs().max().item()
        atol = tolerances.get("atol", 1e-5) * max(scale, 1e-3)
        torch.testing.assert_close(got[name].grad, p.grad, rtol=tolerances.get("rtol", 1e-4), atol=atol, msg=name)


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """The target of token t at t (HF shifts inside its loss; our tiled loss takes them shifted)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
