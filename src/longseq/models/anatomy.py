"""Where the parts longseq works on sit in a transformers causal LM: the CausalLM itself (through a PEFT wrapper),
its decoder layers, their MLPs (dense and mixture-of-experts), their token-wise norms and attention sinks. The one
place that knows the layout of HF decoders.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def find_causal_lm(model) -> PreTrainedModel:
    """The transformers CausalLM inside `model` (the model itself, or the one a PEFT wrapper holds)."""
    candidate = model
    for _ in range(4):
        if isinstance(candidate, PreTrainedModel) and hasattr(candidate, "get_decoder"):
            return candidate
        base = getattr(candidate, "get_base_model", None)
        candidate = base() if callable(base) else getattr(candidate, "model", None)
        if candidate is None:
            break
    raise TypeError(
        f"longseq.apply needs a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...)) or a PEFT "
        f"model wrapping one; got {type(model).__name__}."
    )


def _decoder(model: nn.Module) -> nn.Module | None:
    """The decoder (the model without its head), through a PEFT wrapper if any; None if it has no get_decoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of an HF causal LM, through a PEFT wrapper if any: `get_decoder().layers`, or else every
    transformers GradientCheckpointingLayer in the model."""
    layers = getattr(_decoder(model), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return list(layers)
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        raise ValueError(
            f"Found no decoder layers in {type(model).__name__}: expected `model.get_decoder().layers` or "
            "transformers GradientCheckpointingLayer modules. Switch the MemoryConfig features off for this model."
        )
    return found


def _is_expert_block(module: nn.Module) -> bool:
    """A mixture-of-experts block keeps its experts' weights stacked: parameters of three or more dimensions."""
    return any(p.dim() >= 3 for p in module.parameters())


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's dense MLP: its `mlp` child when the class name ends in 'MLP' and it is not a
    mixture-of-experts block (GPT-OSS calls its expert block an MLP)."""
    return [layer.mlp for layer in decoder_layers(model)
            if type(getattr(layer, "mlp", None)).__name__.endswith("MLP") and not _is_expert_block(layer.mlp)]


def decoder_expert_blocks(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's mixture-of-experts block (its `mlp` child with stacked expert weights); dense layers of
    the same model (Qwen3-MoE's mlp_only_layers) are left out."""
    return [layer.mlp for layer in decoder_layers(model)
            if isinstance(getattr(layer, "mlp", None), nn.Module) and _is_expert_block(layer.mlp)]


def router_class(model) -> type | None:
    """The class whose output[0] transformers records as router logits (`_can_record_outputs["router_logits"]`), or
    None for a model without routers."""
    recorder = getattr(find_causal_lm(model), "_can_record_outputs", None) or {}
    spec = recorder.get("router_logits")
    return getattr(spec, "target_class", spec) if spec is not None else None


def has_attention_sinks(model: nn.Module) -> bool:
    """Whether an attention module of the model has learned sink logits (GPT-OSS: `self_attn.sinks`)."""
    return any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in model.modules())


def _is_rms_norm(module: nn.Module | None) -> bool:
    return module is not None and type(module).__name__.endswith("RMSNorm")


def layer_norms(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's RMSNorms over the hidden dimension (its direct children; per-head q/k norms sit inside the
    attention module and work on (B, H, S, D): not these)."""
    return [m for m in layer.children() if _is_rms_norm(m)]


def decoder_norms(model: nn.Module) -> list[nn.Module]:
    """The RMSNorms over the hidden dimension: those of each decoder layer, then the decoder's final norm."""
    norms = [m for layer in decoder_layers(model) for m in layer_norms(layer)]
    final = getattr(_decoder(model), "norm", None)
    return norms + ([final] if _is_rms_norm(final) else [])


def attention_input_projections(layer: nn.Module) -> list[nn.Module]:
    """The linear layers (plain or PEFT-wrapped: anything with `in_features`) directly inside a decoder layer's
    attention module `self_attn`: q/k/v projections (and o_proj, which reads no norm)."""
    attention = getattr(layer, "self_attn", None)
    return [] if attention is None else [m for m in attention.children() if hasattr(m, "in_features")]
