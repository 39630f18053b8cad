"""Tiny random-weight decoders of every supported family, batches for them, and gradient comparison."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, head_dim=16, initializer_range=0.1, max_position_embeddings=4096)

# Sliding windows shorter than the test sequences, so that windowed layers are really exercised.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 48}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"sliding_window": 40, "attn_logit_softcapping": None, "final_logit_softcapping": 5.0}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 40}),
}

# Mixture-of-experts families, with the router loss on (and a coefficient large enough to show in every gradient).
_ROUTED = {"output_router_logits": True, "router_aux_loss_coef": 0.5, "num_experts_per_tok": 2}
MOE_FAMILIES = {
    # layer 0 dense (mlp_only_layers), layer 1 experts
    "qwen3_moe": ("Qwen3MoeConfig", {**_ROUTED, "num_experts": 8, "moe_intermediate_size": 32, "norm_topk_prob": True,
                                     "mlp_only_layers": [0]}),
    "mixtral": ("MixtralConfig", {**_ROUTED, "num_local_experts": 8, "intermediate_size": 32, "sliding_window": 40}),
    # sliding and full layers alternate; attention sinks; loaded as eager (transformers refuses SDPA for it)
    "gpt_oss": ("GptOssConfig", {**_ROUTED, "num_local_experts": 8, "intermediate_size": 32, "sliding_window": 24}),
}


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    config_name, extra = {**FAMILIES, **MOE_FAMILIES}[family]
    settings = {**COMMON, **extra, **overrides}
    if family == "gemma3":  # alternate windowed and full layers, whatever the depth
        settings.setdefault("layer_types", ["sliding_attention", "full_attention"] * settings["num_hidden_layers"])
        settings["layer_types"] = settings["layer_types"][:settings["num_hidden_layers"]]
    config = getattr(transformers, config_name)(**settings)
    # transformers refuses SDPA for Gemma-2 because of attention softcapping, which these configs switch off, and for
    # GPT-OSS because of its attention sinks, which longseq's attention handles.
    load_as = "eager" if family in ("gemma2", "gpt_oss") else attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=load_as).float()
    model.config._attn_implementation = attn
    return model.train()


def batch(length: int, rows: int = 1, documents: list[int] | None = None, vocab: int = 256, seed: int = 1) -> dict:
    """input_ids and labels; with `documents` (lengths summing to `length`), position_ids restart per document."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[:, ::7] = -100  # some ignored targets
    out = {"input_ids": input_ids, "labels": labels}
    if documents is not None:
        assert sum(documents) == length
        positions = torch.cat([torch.arange(n) for n in documents])
        out["position_ids"] = torch.stack([positions.roll(r * 3) for r in range(rows)])
    return out


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """The target of token t at t (transformers shifts inside its loss; longseq's losses take them shifted)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def assert_grads_equal(reference: torch.nn.Module, model: torch.nn.Module, **tolerances) -> None:
    """Every trainable parameter has a gradient, equal to the reference's (atol relative to its size)."""
    ref = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert ref.keys() == got.keys() and ref
    for name, p in ref.items():
        assert p.grad is not None and got[name].grad is not None, name
        scale = p.grad.abs().max().item()
        atol = tolerances.get("atol", 1e-5) * max(scale, 1e-3)
        torch.testing.assert_close(got[name].grad, p.grad, rtol=tolerances.get("rtol", 1e-4), atol=atol, msg=name)
