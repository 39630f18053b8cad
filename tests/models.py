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
# Hybrids of attention and Gated DeltaNet: a linear-attention layer, then a full-attention one (whatever the depth);
# key and value head sizes differ, and value heads are twice the key heads, to catch any mix-up.
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
              linear_conv_kernel_dim=4)
HYBRID_FAMILIES = {
    "qwen3_next": ("Qwen3NextConfig", {**LINEAR, "num_experts": 0}),
    "qwen3_next_moe": ("Qwen3NextConfig", {**LINEAR, "num_experts": 4, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
    "qwen3_5": ("Qwen3_5TextConfig", LINEAR),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", {**LINEAR, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
    "olmo_hybrid": ("OlmoHybridConfig", {**LINEAR, "pad_token_id": None, "eos_token_id": None, "bos_token_id": None}),
}
HYBRIDS = tuple(HYBRID_FAMILIES)

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
    config_name, extra = {**FAMILIES, **MOE_FAMILIES, **HYBRID_FAMILIES}[family]
    settings = {**COMMON, **extra, **overrides}
    alternating = {"gemma3": "sliding_attention", **{h: "linear_attention" for h in HYBRIDS}}
    if family in alternating:  # alternate windowed or linear layers with full ones, whatever the depth
        settings.setdefault("layer_types", [alternating[family], "full_attention"] * settings["num_hidden_layers"])
        settings["layer_types"] = settings["layer_types"][:settings["num_hidden_layers"]]
    config = getattr(transformers, config_name)(**settings)
    # transformers refuses SDPA for Gemma-2 because of attention softcapping, which these configs switch off, and for
    # GPT-OSS because of its attention sinks, which longseq's attention handles.
    load_as = "eager" if family in ("gemma2", "gpt_oss") else attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=load_as).float()
    model.config._attn_implementation = attn
    _slow_decay(model)
    return model.train()


def _slow_decay(model: torch.nn.Module) -> None:
    """Slow Gated DeltaNet decays, g ≈ −0.007 .. −0.1 per token (A in [0.01, 0.15], dt_bias 0). With the models'
    initialisation (A up to 16) most heads forget within a token, so a state handed between ranks would hardly
    matter and the tests of its hand-off could not fail."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("GatedDeltaNet"):
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0.01, 0.15).log())
                module.dt_bias.zero_()


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
