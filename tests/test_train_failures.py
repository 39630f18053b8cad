"""`longseq train` loses no work and explains every failure in one line: one test per row of docs/train.md's failure
table. Each asserts the exit code, the one message, and that nothing was lost (checkpoints, metrics, config)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longseq.cli import main
from tests.test_train_cli import TINY_MODEL, env, losses, torchrun, write_config


def run_main(capsys, *argv) -> tuple[int, list[str], str]:
    """main(["train", ...]) in this process: (exit code, stderr lines, stdout)."""
    code = main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def error_line(lines: list[str]) -> str:
    """The one error line among stderr's lines (the token cache's first-build note aside)."""
    errors = [line for line in lines if not line.startswith("longseq: tokenizing")]
    assert len(errors) == 1, lines
    return errors[0]


def snapshot(run: Path) -> dict:
    """Every file under a run directory with its bytes, to show that a refused run wrote nothing."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def no_launch(monkeypatch):
    from longseq.train import launch

    monkeypatch.setattr(launch, "spawn_local", lambda *a: pytest.fail("processes were started"))


# --- before launch: configuration, layout, attention, run directory ------------------------------------------------

def test_yaml_error_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config: {model_type: llama\ndata:\n  paths: [a.jsonl]\n")
    code, lines, _ = run_main(capsys, bad)
    assert code == 2
    assert error_line(lines) == (f"longseq train: error: {bad}:3:5: not valid YAML: expected ',' or '}}', but got ':' "
                                 "(while parsing a flow mapping). Fix the file there.")


@pytest.mark.parametrize("overrides,message", [
    (["--nproc", "2", "--parallel.sp=3"], "parallel.sp=3 needs 3 processes, but the run has 2: launch 3 (--nproc 3"),
    (["--nproc", "4", "--parallel.sp=3"], "parallel.sp=3 does not divide the 4 processes of the run: choose "
                                          "parallel.sp among [1, 2, 4]"),
    (["--nproc", "2", "--parallel.dp=2", "--parallel.sp=2"], "parallel.dp=2 × parallel.sp=2 = 4, but the run has 2"),
    (["--nproc", "2", "--model.attn_implementation=eager"], "model.attn_implementation=eager runs at parallel.sp=1 "
                                                            "only (this run has sp=2)"),
    (["--nproc", "2", "--model.attn_implementation=flash_attention_2"], "needs the flash-attn package and a CUDA GPU"),
])
def test_layout_and_attention_are_checked_before_launch(tmp_path, capsys, monkeypatch, overrides, message):
    no_launch(monkeypatch)
    code, lines, _ = run_main(capsys, write_config(tmp_path, "layout"), *overrides)
    assert code == 2 and message in error_line(lines)
    assert not (tmp_path / "layout" / "config.yaml").exists()


def test_help_says_eager_is_sp1_only(capsys):
    assert main(["train", "--help"]) == 0
    assert "eager (parallel.sp = 1 only)" in " ".join(capsys.readouterr().out.split())


def test_apply_refuses_flash_attention_it_cannot_run():
    import longseq
    from tests.models import tiny_model

    with pytest.raises(ValueError, match="needs the flash-attn package and a CUDA GPU.*or use attention='sdpa'"):
        longseq.apply(tiny_model("llama"), longseq.Mesh(world_size=2, sp=2, ulysses=2), attention="flash_attention_2")


def test_sp_against_world_size_under_torchrun_is_said_once(tmp_path):
    """Under torchrun the ranks exit 2 and only rank 0 prints, instead of a traceback per rank (torchrun's agent adds
    its own report, and may stop the second rank with SIGTERM before it exits by itself). Rank 0 starts late, so rank
    1 meets the error first: the line must still be printed (torchrun stops the others when one exits)."""
    result = torchrun("-m", "tests.rank0_late", "longseq.cli", "train", str(write_config(tmp_path, "world")),
                      "--parallel.sp=3", timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("longseq train: error: parallel.sp=3 needs 3 processes, but the run has 2") == 1
    assert "exitcode  : 2" in result.stderr.split("Root Cause")[1]
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr  # the agent's, no worker's


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_run_dir_that_cannot_be_written(tmp_path, capsys, monkeypatch, where):
    no_launch(monkeypatch)
    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run" if where == "under_a_file" else Path("/proc/longseq-run")
    code, lines, _ = run_main(capsys, write_config(tmp_path, "w"), f"--metrics.run_dir={run_dir}", "--nproc", "2")
    expected = (f"{tmp_path / 'file'} is a file. Choose another metrics.run_dir" if where == "under_a_file" else
                f"metrics.run_dir={run_dir} is not writable")
    assert code == 2 and expected in error_line(lines)


def test_malformed_json_names_line_column_and_reason(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "a\tb"}\n')
    code, lines, _ = run_main(capsys, write_config(tmp_path, "json", data={"paths": [str(data)]}))
    assert code == 2
    assert f"{data}:2:12: not valid JSON: Invalid control character at: line 2 column 12" in error_line(lines)


# --- resuming: fingerprint, damaged and cut-short checkpoints, metrics ---------------------------------------------

def test_another_experiment_in_the_run_dir_stops_before_writing(tmp_path, capsys):
    config = write_config(tmp_path, "exp", training={"steps": 2})
    code, _, out = run_main(capsys, config)
    run = tmp_path / "exp"
    assert code == 0 and (run / "loss.png").stat().st_size > 0
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("longseq train: loss ") and "over steps 1–2" in summary and str(run) in summary
    before = snapshot(run)

    code, lines, _ = run_main(capsys, config, "--data.seq_len=64", "--data.max_documents=100", "--optim.lr=1e-3",
                              "--training.steps=3")
    assert code == 2 and snapshot(run) == before
    assert re.fullmatch(
        re.escape(f"longseq train: error: {run}/checkpoints/step_000002 belongs to another experiment: its data, "
                  "seq_len differ (data.documents 120 → 100; data.max_documents None → 100; data.tokens ")
        + r"\d+ → \d+" + re.escape(
            f"; data.seq_len 128 → 64). Use a new --metrics.run_dir, start over in {run} with "
            f"--checkpoint.resume=false (its checkpoints are set aside), or resume anyway with "
            f"--checkpoint.resume_from={run}/checkpoints/step_000002."), error_line(lines))

    wider = write_config(tmp_path, "wider", model={"config": {**TINY_MODEL, "hidden_size": 64}})
    code, lines, _ = run_main(capsys, wider, f"--metrics.run_dir={run}",
                              f"--checkpoint.resume_from={run}/checkpoints/step_000002")
    assert code == 2 and "holds another model: its model differs (model.config.hidden_size 32 → 64)" in \
        error_line(lines)

    code, lines, _ = run_main(capsys, config, "--data.seq_len=64", "--training.steps=3", "--checkpoint.resume=false")
    assert code == 0 and sorted(losses(run)) == [1, 2, 3]
    replaced = list(run.glob("replaced-*"))
    assert len(replaced) == 1 and (replaced[0] / "checkpoints" / "step_000002" / ".metadata").exists()
    assert sorted(json.loads(r)["step"] for r in (replaced[0] / "metrics.jsonl").read_text().splitlines()) == [1, 2]


def test_damaged_checkpoints_are_named_with_the_intact_one(tmp_path, capsys):
    config = write_config(tmp_path, "dmg")
    assert main(["train", str(config)]) == 0
    run, _ = tmp_path / "dmg", capsys.readouterr()
    last, intact = run / "checkpoints" / "step_000004", run / "checkpoints" / "step_000002"
    shard = next(last.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    before = snapshot(run)
    code, lines, _ = run_main(capsys, config, "--training.steps=6")
    assert code == 2 and snapshot(run) == before
    assert error_line(lines) == (
        f"longseq train: error: checkpoint {last} is truncated or corrupt ({shard.name} has 1000 bytes of the "
        f"{_listed_size(last, shard.name)} that .metadata lists): resume from the intact step_000002 with "
        f"--checkpoint.resume_from={intact} (newer checkpoints are set aside).")

    (last / ".metadata").write_bytes(b"not a pickle")
    code, lines, _ = run_main(capsys, config, "--training.steps=6")
    assert code == 2 and f"checkpoint {last} is truncated or corrupt (.metadata cannot be read: " in error_line(lines)

    code, lines, _ = run_main(capsys, config, "--training.steps=5", f"--checkpoint.resume_from={intact}")
    assert code == 0 and sorted(losses(run)) == [1, 2, 3, 4, 5]
    assert any("moved 1 checkpoint(s) after step 2 (step_000004)" in line for line in lines)


def _listed_size(path: Path, name: str) -> int:
    from torch.distributed.checkpoint import FileSystemReader

    items = FileSystemReader(str(path)).read_metadata().storage_data.values()
    return max(i.offset + i.length for i in items if i.relative_path == name)


def test_a_save_cut_short_is_named_and_the_metrics_follow_the_resume(tmp_path, capsys):
    """A step directory without .metadata: a warning names it and the checkpoint used; metrics.jsonl is cut back to
    that step, so the resumed steps appear once."""
    config = write_config(tmp_path, "cut")
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    run = tmp_path / "cut"
    (run / "checkpoints" / "step_000004" / ".metadata").unlink()
    full = losses(run)
    code, lines, _ = run_main(capsys, config, "--training.steps=5")
    assert code == 0
    assert (f"longseq: warning: step_000004 in {run / 'checkpoints'} has no .metadata (its save was cut short); "
            f"resuming from {run / 'checkpoints' / 'step_000002'}.") in lines
    resumed = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [1, 2, 3, 4, 5]
    assert losses(run)[4] == full[4]  # the retrained step 4 is the same step


# --- stopping: signals and a closed output pipe ----------------------------------------------------------------------

def _start(config: Path, *args) -> subprocess.Popen:
    command = [sys.executable, "-m", "longseq.cli", "train", str(config), "--metrics.progress=true", *args]
    return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_steps(process: subprocess.Popen, run: Path, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < count:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.2)


def _check_stopped(process: subprocess.Popen, run: Path, signum: int) -> None:
    """Exit 128 + signum, one line naming the saved checkpoint, and every step up to it in the metrics."""
    err = process.stderr.read()
    assert process.wait(timeout=240) == 128 + signum, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("longseq: tokenizing")]
    assert len(lines) == 1, err
    name = signal.Signals(signum).name
    step = int(lines[0].split("stopped at step ")[1].split(" ")[0])
    assert lines[0] == (f"longseq train: stopped at step {step} by {name}; checkpoint saved in "
                        f"{run / 'checkpoints' / f'step_{step:06d}'}. Run the same command to resume.")
    assert (run / "checkpoints" / f"step_{step:06d}" / ".metadata").exists()
    assert sorted(losses(run)) == list(range(1, step + 1))


def test_closed_pipe_never_kills_the_run(tmp_path):
    """`longseq train ... | tee log`, then Ctrl-C: tee dies first, the trainer keeps writing into the closed pipe,
    then gets SIGINT and saves."""
    config = write_config(tmp_path, "pipe", training={"steps": 100000}, checkpoint={"every": 0})
    process = _start(config)
    first = process.stdout.readline()
    assert first.startswith("step 1/100000 loss "), first
    process.stdout.close()
    _wait_for_steps(process, tmp_path / "pipe", 4)  # steps 2-4 wrote into the closed pipe
    os.killpg(process.pid, signal.SIGINT)
    _check_stopped(process, tmp_path / "pipe", signal.SIGINT)


@pytest.mark.parametrize("signum,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl_c_at_the_terminal", "sigterm_to_the_launcher"])
def test_stop_signals_under_nproc_2(tmp_path, signum, to_group):
    """Ctrl-C reaches the launcher's process group (with `| tee` closed); SIGTERM only the launcher (preemption)."""
    config = write_config(tmp_path, "nproc", parallel={"sp": 2}, training={"steps": 100000}, checkpoint={"every": 0})
    process = _start(config, "--nproc", "2")
    _wait_for_steps(process, tmp_path / "nproc", 2)
    if to_group:
        process.stdout.close()
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    _check_stopped(process, tmp_path / "nproc", signum)


def test_a_failing_worker_stops_the_others_at_once():
    """--nproc's launcher: the first failure decides the exit code and the other workers are killed, not left
    waiting in a collective; exits every rank makes together (2) give rank 0 time to print."""
    from longseq.train.launch import _watch

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    workers = [subprocess.Popen(sleeper), subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])]
    started = time.monotonic()
    assert _watch(workers) == 3 and time.monotonic() - started < 30
    assert workers[0].returncode == -signal.SIGKILL
    together = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(2)"]),
                subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])]
    assert _watch(together) == 2 and together[0].returncode == 2


def test_a_repeated_stop_signal_aborts_and_a_forwarded_copy_does_not(monkeypatch, capsys):
    """The first SIGINT/SIGTERM/SIGHUP asks for a save; the same Ctrl-C forwarded by torchrun's agent (within
    REPEAT_S) is not a second request; a later one aborts at once with one line, without saving."""
    from longseq.mesh import Mesh
    from longseq.train import loop, signals

    aborted = []
    for signum in signals.STOP_SIGNALS:
        with signals.StopRequests(aborted.append) as stop:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.agreed(Mesh()) == signum and aborted == []
            stop.first_at -= signals.REPEAT_S + 1
            os.kill(os.getpid(), signal.SIGTERM)
            assert aborted == [signal.SIGTERM]
        aborted.clear()
        assert signal.getsignal(signum) is not stop._handle

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(loop.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as exited:
        loop._abort(signal.SIGINT, Path("/nonexistent/run"), Mesh())
    assert exited.value.code == 130
    assert capsys.readouterr().err == ("longseq train: aborted by a second SIGINT without saving; there is no "
                                       "checkpoint yet.\n")
