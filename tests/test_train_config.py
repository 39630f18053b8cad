"""`longseq train` configuration: YAML + overrides, errors that name the field and suggest the fix, --help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from longseq.cli import main as cli_main
from longseq.train.config import ConfigError
from longseq.train.config_loader import field_docs, from_dict, load_config, sections, to_dict
from longseq.train.demo import DEMO

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"config": {"model_type": "llama"}}, "data": {"paths": ["x.jsonl"]}}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {config: {model_type: llama}}\ndata: {paths: [a.jsonl], seq_len: 256}\n"
                    "optim: {lr: 1.0e-3}\n")
    config = load_config(path, ["--optim.lr=1e-4", "--data.paths=a.jsonl,b.jsonl", "--training.cpu_offload=true",
                                "--checkpoint.keep=none", "--memory.tile_tokens=512"])
    assert config.optim.lr == 1e-4 and config.data.seq_len == 256
    assert config.data.paths == ["a.jsonl", "b.jsonl"]
    assert config.training.cpu_offload is True and config.checkpoint.keep is None
    assert config.memory.overrides == {"tile_tokens": 512}


def test_memory_keys_set_only_themselves(tmp_path):
    """The memory section defaults to auto (the plan's choice per batch shape); a key forces that key of it;
    `auto: false` gives a MemoryConfig of exactly the keys given (others all on); false switches all off."""
    from longseq import AutoMemory, MemoryConfig

    assert load_config(None, [], base=MINIMAL).memory.overrides == {}
    one_off = load_config(None, ["--memory.tiled_mlp=false"], base=MINIMAL).memory
    assert isinstance(one_off, AutoMemory) and one_off.overrides == {"tiled_mlp": False}
    assert load_config(None, ["--memory=auto", "--memory.tiled_mlp=false"], base=MINIMAL).memory.overrides == \
        {"tiled_mlp": False}
    explicit = load_config(None, ["--memory.auto=false", "--memory.tiled_mlp=false"], base=MINIMAL).memory
    assert explicit == MemoryConfig(tiled_mlp=False)
    assert load_config(None, ["--memory.tiled_mlp=false", "--memory=false"], base=MINIMAL).memory is None
    path = tmp_path / "off.yaml"
    path.write_text("model: {config: {model_type: llama}}\ndata: {paths: [a.jsonl]}\nmemory: false\n")
    assert load_config(path).memory is None
    with pytest.raises(ConfigError, match="memory is switched off .*drop `memory: false`"):
        load_config(path, ["--memory.tiled_loss=true"])
    path.write_text("model: {config: {model_type: llama}}\ndata: {paths: [a.jsonl]}\nmemory: auto\n")
    assert load_config(path, ["--memory.tiled_loss=false"]).memory.overrides == {"tiled_loss": False}
    for config in (one_off, explicit, None):  # a run's config.yaml reads back as the same config
        whole = load_config(None, [], base=MINIMAL)
        whole.memory = config
        again = load_config(None, [], base=to_dict(whole)).memory
        assert again == config if not isinstance(config, AutoMemory) else again.overrides == config.overrides


@pytest.mark.parametrize("overrides,message", [
    (["--training.stpes=3"], "unknown key training.stpes; did you mean 'training.steps'"),
    (["--trainig.steps=3"], "unknown section 'trainig'; did you mean 'training'"),
    (["--memory.tiled_mpl=true"], "did you mean 'memory.tiled_mlp'"),
    (["--training.steps=many"], "training.steps='many' is not a valid int"),
    (["--training.steps=0"], "training.steps=0 must be at least 1"),
    (["--optim.schedule=cosin"], "optim.schedule='cosin': choose cosine, linear or constant"),
    (["--parallel.sp=0"], "parallel.sp=0 must be a positive integer"),
    (["--memory.tile_memory_mib=0"], "tile_memory_mib=0 must be at least 1"),
    (["--data.paths=[]"], "data.paths is empty"),
    (["--training.steps"], "must look like --section.key=value"),
])
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, overrides, base=MINIMAL)


def test_model_needs_a_source():
    with pytest.raises(ConfigError, match="model.path is not set"):
        from_dict({"model": {}, "data": {"paths": ["x"]}})


def test_every_field_has_a_default_and_a_doc(capsys):
    for name, cls in sections().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            assert docs.get(f.name), f"{name}.{f.name} has no doc line"
    assert cli_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name, cls in sections().items():
        for f in dataclasses.fields(cls):
            assert f"--{name}.{f.name}=" in out
    assert "torchrun --nproc-per-node" in out


def test_cli_errors(capsys):
    assert cli_main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    assert cli_main(["train", "--demo", "--training.stpes=3"]) == 2
    assert "did you mean 'training.steps'" in capsys.readouterr().err
    assert cli_main(["train", "/no/such.yaml"]) == 2
    assert "cannot read the config file /no/such.yaml" in capsys.readouterr().err


def test_demo_yaml_is_the_embedded_demo():
    assert load_config(ROOT / "configs" / "demo.yaml") == from_dict(DEMO)
    load_config(ROOT / "configs" / "llama-8b-64k.yaml")


def test_matmul_params_count_the_routed_experts_only():
    from longseq.train.metrics import matmul_params
    from tests.models import tiny_model

    model = tiny_model("qwen3_moe")  # layer 1: 8 experts, 2 per token, each gate/up/down of 64 × 32
    embedding = model.get_input_embeddings().weight.numel()
    everything = sum(p.numel() for p in model.parameters()) - embedding
    assert matmul_params(model) == everything - (8 - 2) * 3 * 64 * 32
    dense = tiny_model("llama")
    assert matmul_params(dense) == sum(p.numel() for p in dense.parameters()) - dense.get_input_embeddings().weight.numel()


def test_train_flops_counts_attention_per_document():
    from longseq.train.metrics import train_flops

    whole = torch.arange(8)[None]
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    assert train_flops(10, 2, 4, whole) == 6 * 10 * 8 + 6 * 2 * 4 * 8**2
    assert train_flops(10, 2, 4, packed) == 6 * 10 * 8 + 6 * 2 * 4 * (3**2 + 5**2)
