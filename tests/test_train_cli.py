"""`longseq train` end to end on CPU: torchrun with 2 gloo ranks (sp=2, dp=2), two torchrun agents as two nodes,
exact resume, the Hugging Face export, and the failure paths (OOM, Ctrl-C, a dying rank, bad lengths).

This file is also the worker script of the dying-rank test: `torchrun ... tests/test_train_cli.py die CONFIG`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259, "max_position_embeddings": 512}


def write_config(tmp: Path, run: str, **sections) -> Path:
    """A tiny Llama on synthetic code-like documents, 128-token sequences; `sections` override keys."""
    data = tmp / "docs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n" + f"    return x * {i} + {i % 7}\n" * (i % 9 + 1)})
                                + "\n" for i in range(120)))
    config = {"model": {"config": TINY_MODEL},
              "data": {"paths": [str(data)], "seq_len": 128, "cache_dir": str(tmp / "token-cache")},
              "optim": {"lr": 3e-3, "warmup_steps": 1}, "training": {"steps": 4, "batch_size": 1},
              "checkpoint": {"every": 2, "keep": None, "export_hf": False},
              "metrics": {"run_dir": str(tmp / run), "progress": False, "tensorboard": False}}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def eval_docs(tmp: Path) -> str:
    """Held-out documents unlike the training ones (29 rows of 128 tokens)."""
    path = tmp / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": f"class C{i}:\n" + f"    value = {i} - {i % 5}\n" * (i % 6 + 2)})
                            + "\n" for i in range(40)))
    return str(path)


def eval_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc: int = 2, timeout: int = 180, extra: tuple = ("--standalone",)):
    command = [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def check(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def sp2_run(tmp_path_factory):
    """4 steps on 2 ranks with sp=2, checkpoints at 2 and 4, evaluation at 2 and 4, and the HF export."""
    tmp = tmp_path_factory.mktemp("sp2")
    config = write_config(tmp, "sp2", parallel={"sp": 2}, checkpoint={"export_hf": True},
                          metrics={"tensorboard": True},
                          eval={"paths": [eval_docs(tmp)], "every": 2, "max_sequences": 7})
    check(torchrun("-m", "longseq.cli", "train", str(config)))
    return tmp, config


def test_sp2_run_writes_everything(sp2_run):
    tmp, _ = sp2_run
    run = tmp / "sp2"
    logged = losses(run)
    assert sorted(logged) == [1, 2, 3, 4]
    assert logged[4][0] < logged[1][0]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step_000002", "step_000004"}
    assert yaml.safe_load((run / "config.yaml").read_text())["parallel"]["sp"] == 2
    assert list((run / "tensorboard").iterdir())


def test_eval_loss_is_exact_under_sequence_parallelism(sp2_run, tmp_path):
    """The sharded eval loss at sp=2 equals one process's at sp=1, evaluated on the same rows after the same steps."""
    tmp, config = sp2_run
    _in_process(config, "--parallel.sp=1", f"--metrics.run_dir={tmp_path / 'sp1'}", "--checkpoint.export_hf=false")
    sharded, single = eval_losses(tmp / "sp2"), eval_losses(tmp_path / "sp1")
    assert sorted(sharded) == sorted(single) == [2, 4]
    torch.testing.assert_close(torch.tensor([sharded[2], sharded[4]]), torch.tensor([single[2], single[4]]),
                               atol=2e-6, rtol=2e-6)
    assert sharded[4] < sharded[2]


def test_resume_is_exact(sp2_run, tmp_path):
    """Resuming from step 2 reproduces steps 3 and 4 of the uninterrupted run bit for bit."""
    tmp, config = sp2_run
    start = tmp / "sp2" / "checkpoints" / "step_000002"
    check(torchrun("-m", "longseq.cli", "train", str(config), f"--metrics.run_dir={tmp_path / 'resumed'}",
                   f"--checkpoint.resume_from={start}", "--checkpoint.export_hf=false"))
    resumed, full = losses(tmp_path / "resumed"), losses(tmp / "sp2")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


def test_hf_export_round_trip(sp2_run):
    """from_pretrained(export) gives the same logits as the trained weights in the final DCP checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp, _ = sp2_run
    run = tmp / "sp2"
    exported = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    assert exported.config._attn_implementation == "sdpa"
    dcp_to_torch_save(run / "checkpoints" / "step_000004", tmp / "final.pt")
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "hf")).eval()
    trained.load_state_dict(torch.load(tmp / "final.pt", weights_only=False)["train"]["model"])
    ids = torch.randint(0, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, atol=0, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dp2_one_node_and_two_nodes(tmp_path):
    """dp=2 on one node; the same run on two torchrun agents (rendezvous on localhost) gives identical losses,
    and both match one process accumulating the same 4 rows per step."""
    evaluation = {"paths": [eval_docs(tmp_path)], "max_sequences": 5}  # odd: one dp rank runs an empty last round
    config = write_config(tmp_path, "dp2", parallel={"dp": 2}, training={"grad_accum": 2, "steps": 3}, eval=evaluation)
    check(torchrun("-m", "longseq.cli", "train", str(config)))
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", f"--node-rank={node}", "--rdzv-id=two-nodes",
         "-m", "longseq.cli", "train", str(config), f"--metrics.run_dir={tmp_path / 'nodes'}"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for agent in agents:
        out, err = agent.communicate(timeout=180)
        assert agent.returncode == 0, err[-6000:]
    assert losses(tmp_path / "nodes") == losses(tmp_path / "dp2")
    _in_process(write_config(tmp_path, "single", training={"grad_accum": 4, "steps": 3}, eval=evaluation))
    single, dp2 = losses(tmp_path / "single"), losses(tmp_path / "dp2")
    for step in (1, 2, 3):
        torch.testing.assert_close(torch.tensor(single[step]), torch.tensor(dp2[step]), atol=2e-6, rtol=2e-6)
    assert list(eval_losses(tmp_path / "dp2")) == [3]
    torch.testing.assert_close(eval_losses(tmp_path / "dp2")[3], eval_losses(tmp_path / "single")[3], atol=2e-6,
                               rtol=2e-6)


def _in_process(config: Path, *overrides: str):
    from longseq.train.config_loader import load_config
    from longseq.train.loop import train

    return train(load_config(config, list(overrides)))


def test_default_memory_plans_a_mixture_of_experts_model(tmp_path):
    """`memory: auto` (the default) plans a Qwen3-MoE model directory (a dense layer, then experts; the router loss
    on) and a step runs with the configuration the plan chose."""
    import transformers

    model_dir = tmp_path / "tiny-moe"
    transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=259, max_position_embeddings=512,
                                output_router_logits=True, mlp_only_layers=[0]).save_pretrained(model_dir)
    config = write_config(tmp_path, "moe", model={"config": {}, "path": str(model_dir), "random_init": True},
                          training={"steps": 1})
    rows = _in_process(config)
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] > 0


def test_ctrl_c_saves_and_resumes(tmp_path, monkeypatch):
    from longseq.train import loop

    config = write_config(tmp_path, "interrupted", checkpoint={"every": 0})
    original = loop.train_step

    def interrupted_at_2(config, mesh, model, dataset, state):
        out = original(config, mesh, model, dataset, state)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop, "train_step", interrupted_at_2)
    with pytest.raises(loop.Interrupted, match="stopped at step 2 by SIGINT"):
        _in_process(config)
    assert (tmp_path / "interrupted" / "checkpoints" / "step_000002" / ".metadata").exists()
    monkeypatch.setattr(loop, "train_step", original)
    rows = _in_process(config)
    assert [r["step"] for r in rows] == [3, 4]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_out_of_memory_is_explained(tmp_path, monkeypatch, capsys):
    from longseq.cli import main
    from longseq.train import loop

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "train_step", oom)
    assert main(["train", str(write_config(tmp_path, "oom", memory={"tiled_loss": False}))]) == 1
    err = capsys.readouterr().err
    assert "out of memory at step 1 with data.seq_len=128" in err
    assert "--memory.tiled_loss=true" in err and "raise parallel.sp" in err
    assert "--memory.tiled_mlp=true" not in err  # already on
    assert main(["train", str(write_config(tmp_path, "oom_plain")), "--memory=false"]) == 1
    assert "drop `memory: false`" in capsys.readouterr().err


def test_length_the_mesh_cannot_shard():
    from longseq.mesh import Mesh
    from longseq.train.config import ConfigError
    from longseq.train.preflight import check_shardable

    with pytest.raises(ConfigError, match="data.seq_len=130 cannot be split evenly over sp=4.*data.seq_len=132"):
        check_shardable(130, Mesh(world_size=4, sp=4, ulysses=4))
    with pytest.raises(ConfigError, match="ring=2 .*multiple of 8"):
        check_shardable(100, Mesh(world_size=4, sp=4, ulysses=2, ring=2))
    check_shardable(128, Mesh(world_size=4, sp=4, ulysses=4))


def test_unreadable_data_stops_before_training(tmp_path, capsys):
    from longseq.cli import main

    config = write_config(tmp_path, "bad", data={"paths": [str(tmp_path / "nowhere.jsonl")]})
    assert main(["train", str(config)]) == 2
    assert "nowhere.jsonl does not exist" in capsys.readouterr().err


def test_a_dying_rank_stops_the_others(tmp_path):
    """Rank 1 fails at step 2: torchrun reports its error as the root cause and rank 0 does not hang."""
    config = write_config(tmp_path, "die", parallel={"sp": 2})
    result = torchrun(__file__, "die", str(config), timeout=120)
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 2" in result.stderr
    assert "rank      : 1" in result.stderr.split("Root Cause")[1]


def _die(config_path: str) -> None:
    """Worker entry of test_a_dying_rank_stops_the_others."""
    from longseq.cli import main
    from longseq.train import loop

    original = loop.train_step

    def failing(config, mesh, model, dataset, state):
        if mesh.rank == 1 and state.step == 1:
            raise RuntimeError("injected failure on rank 1 at step 2")
        return original(config, mesh, model, dataset, state)

    loop.train_step = failing
    sys.exit(main(["train", config_path]))


if __name__ == "__main__" and sys.argv[1] == "die":
    _die(sys.argv[2])
