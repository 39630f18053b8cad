"""`longseq plan`: the table, --json, --length max, and one-line errors.

    PYTHONPATH=src python -m pytest -q tests/test_plan_cli.py
"""

from __future__ import annotations

import json

import transformers

import longseq
from longseq import cli


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table(capsys):
    code, out, _ = run(capsys, "--shape", "llama-8b", "--length", "128k", "--gpu-mem-gib", "79",
                       "--training", "forward-backward")
    assert code == 0
    for line in ("1 × 131072 tokens", "GPU per rank, peak at", "weights, gradients, optimizer", "host per rank",
                 "host arena", "(limit 75.05)", "step time:", "tokens/s", "configuration:",
                 "longseq train: --memory.tiled_mlp=", "assumed, not measured, in the card:"):
        assert line in out, line


def test_json_settings_map_onto_memory_config(capsys):
    code, out, _ = run(capsys, "--shape", "llama-8b", "--gpus", "2", "--length", "256k", "--json")
    d = json.loads(out)
    assert code == 0 and d["fits"] and d["layout"] == {"sp": 2, "ulysses": 2, "ring": 1, "dp": 1}
    assert d["gpu"]["peak_gib"] <= d["machine"]["gpu_limit_gib"]
    assert d["host"]["per_host_gib"] <= d["machine"]["host_limit_gib"]
    assert d["time"]["step_s"] > 0 and d["time"]["tokens_per_s"] == 262144 / d["time"]["step_s"]
    memory = {k.removeprefix("memory."): v for k, v in d["settings"].items() if k.startswith("memory.")}
    config = longseq.MemoryConfig(**memory)
    assert config.cache_attention == d["choice"]["cache_attention"]
    assert d["settings"]["training.cpu_offload"] == d["choice"]["fsdp_cpu_offload"]


def test_length_max_names_the_limit(capsys):
    code, out, _ = run(capsys, "--shape", "llama-1b", "--length", "max", "--gpu-mem-gib", "40", "--lora")
    assert code == 0 and "longest length that fits:" in out and "limited by" in out
    d = json.loads(run(capsys, "--shape", "llama-1b", "--length", "max", "--gpu-mem-gib", "40", "--lora",
                       "--json")[1])
    assert d["longest_length"] == d["workload"]["length"] > 0 and d["limit"]


def test_model_from_a_config_directory(capsys, tmp_path):
    transformers.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, vocab_size=1000).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "--model", str(tmp_path), "--length", "64k", "--json")
    d = json.loads(out)
    assert code == 0 and d["model"]["qk_norm"] and d["model"]["layers"] == 2


def test_mixture_of_experts_and_hybrid_configs(capsys, tmp_path):
    """A Qwen3-MoE and a Qwen3-Next config.json: the table names the layer kinds and active parameters, and the
    JSON carries the experts and the Gated DeltaNet's dimensions."""
    moe, hybrid = tmp_path / "moe", tmp_path / "hybrid"
    transformers.Qwen3MoeConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                head_dim=64, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4,
                                mlp_only_layers=[0], vocab_size=32000).save_pretrained(moe)
    transformers.Qwen3NextConfig(num_hidden_layers=4).save_pretrained(hybrid)
    code, out, _ = run(capsys, "--model", str(moe), "--length", "64k", "--lora")
    assert code == 0 and "4 layers: 4 attention; 3 with experts (32, top 4)" in out and "B active" in out
    assert "GPU per rank, peak at" in out and "longseq train: --memory.tiled_mlp=" in out
    code, out, _ = run(capsys, "--model", str(hybrid), "--length", "64k", "--lora", "--json")
    d = json.loads(out)
    assert code == 0 and d["model"]["linear"]["v_heads"] == 32 and d["model"]["experts"]["shared_intermediate"]
    assert "linear attention" in d["time"]["components_s"]


def test_impossible_configuration_exits_1_and_says_what_is_short(capsys):
    code, out, _ = run(capsys, "--shape", "llama-8b", "--length", "4M", "--gpu-mem-gib", "79")
    assert code == 1 and "DOES NOT FIT" in out and "GPU memory is short by at least" in out
    d = json.loads(run(capsys, "--shape", "llama-8b", "--length", "4M", "--gpu-mem-gib", "79", "--json")[1])
    assert not d["fits"] and d["shortfall"]["gpu_gib"] > 0 and "settings" not in d


def test_bad_input_is_one_line(capsys):
    for argv, words in ((["--shape", "llama-8b", "--length", "lots"], "--length 'lots'"),
                        (["--shape", "llama-8b", "--length", "1k", "--gpus", "4", "--sp", "3"], "--sp 3"),
                        (["--model", "/nowhere", "--length", "1k"], "named shape"),
                        (["--shape", "llama-8b", "--length", "1k", "--card", "b300"], "calibrate.py")):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and words in err and err.count("\n") == 1, err


def test_listed_in_longseq_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "plan " in capsys.readouterr().out
