"""models/anatomy.py: the CausalLM, decoder layers, MLPs and norms of HF models, directly and through PEFT."""

from __future__ import annotations

import peft
import pytest
import torch

from longseq.models.anatomy import decoder_layers, decoder_mlps, decoder_norms, find_causal_lm
from tests.models import tiny_model


def test_parts_of_a_model_and_of_its_peft_wrapper():
    model = tiny_model("qwen3", num_hidden_layers=3)  # qwen3 also has per-head q/k norms, which are not these
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for candidate in (model, wrapped):
        assert find_causal_lm(candidate) is model
        assert decoder_layers(candidate) == list(model.model.layers)
        assert decoder_mlps(candidate) == [layer.mlp for layer in model.model.layers]
        norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        assert decoder_norms(candidate) == norms + [model.model.norm]


def test_decoder_layers_without_get_decoder():
    model = tiny_model()
    assert decoder_layers(torch.nn.Sequential(*model.model.layers)) == list(model.model.layers)


def test_not_a_causal_lm():
    with pytest.raises(TypeError, match="Linear"):
        find_causal_lm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
