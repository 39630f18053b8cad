"""The peer report's arithmetic (bench/report_peers.py) on made-up records: shapes never mix, a speed ratio needs the
same work on both sides, every comparison names its commits and states, and a ratio of longest lengths appears only
where the peer ran out of memory."""

from __future__ import annotations

from bench.peers_ideal import with_ideal
from bench.report_peers import comparison_table, summary


def _run(contender, length, status="ok", shape="llama-8b", tokens=1000.0, peak=10.0, loss=1.0, **extra):
    extra = {"optimizer": "adamw", **extra}
    return dict(contender=contender, shape=shape, sp=2, layers="full", length=length, status=status, timed_steps=1,
                tokens_per_s_per_gpu=tokens, step_s=length / tokens / 2, peak_gib=peak, first_step_loss=loss,
                placement="gpu", placements_tried=["gpu"], code="abc1234", device_call=19, **extra)


def test_ratios_per_shape_and_longest_only_where_the_peer_ran_out_of_memory():
    records = [_run("longseq", 65536, tokens=1500.0), _run("alst", 65536),
               _run("longseq", 65536, shape="llama-1b", tokens=9000.0), _run("alst", 65536, shape="llama-1b"),
               _run("longseq", 131072, peak=12.0), _run("alst", 131072, status="timeout"),
               _run("longseq", 262144, peak=16.0)]
    out = summary(records)
    eight, one = (out["longseq_vs_peers"][f"llama-{s}/sp2/layers=full"]["65536"]["alst"] for s in ("8b", "1b"))
    assert eight["tokens_per_s_ratio"] == 1.5 and one["tokens_per_s_ratio"] == 9.0
    assert eight["code"] == "abc1234/abc1234" and eight["state"] == "gpu / gpu"
    assert out["marginal_kib_per_token"]["llama-8b/sp2/layers=full/longseq"] == {"131072-262144": 4 * 2**20 / 65536}
    limits = out["longest"]["llama-8b/sp2/layers=full"]
    assert limits["longest_ok_alst"] == 65536 and "longest_ratio_vs_alst" not in limits  # a timeout bounds nothing
    records.append(_run("alst", 196608, status="oom"))
    limits = summary(records)["longest"]["llama-8b/sp2/layers=full"]
    assert limits["out_of_memory_alst"] == 196608 and limits["longest_ratio_vs_alst"] == 4.0
    assert limits["longest_ratio_vs_alst_is"].startswith("a lower bound")


def test_no_speed_ratio_between_different_steps_and_old_placements_are_starred():
    hf = _run("hf", 65536, tokens=3000.0, optimizer="none")
    alst = {k: v for k, v in _run("alst", 65536, tokens=500.0).items() if k not in ("placement", "placements_tried")}
    alst["settings"] = {"zero": {"stage": 3, "offload_optimizer": {}, "offload_param": {}}}
    records = [_run("longseq", 65536, tokens=1000.0), hf, alst]
    at = summary(records)["longseq_vs_peers"]["llama-8b/sp2/layers=full"]["65536"]
    assert "tokens_per_s_ratio" not in at["hf"] and "optimizer adamw vs none" in at["hf"]["no_ratio"]
    assert at["alst"]["tokens_per_s_ratio"] == 2.0 and at["alst"]["state"] == "gpu / all*"
    readme = comparison_table(records, ratios_only=True)
    assert "| alst | 2.00× |" in readme and "| hf |" not in readme


def test_ideal_step_joins_ok_records_of_its_length_only():
    calibration = {"65536": {"ideal_step_s": 10.0, "attention_tflops": 500.0}}
    ok = with_ideal(_run("longseq", 65536, tokens=1000.0), calibration)  # step_s = 32.768
    assert abs(ok["pct_of_ideal"] - 100 * 10.0 / 32.768) < 1e-9 and ok["attention_tflops"] == 500.0
    assert "ideal_step_s" not in with_ideal(_run("alst", 65536, status="oom"), calibration)
    assert "ideal_step_s" not in with_ideal(_run("alst", 131072), calibration)


def test_no_memory_per_token_between_two_memory_configurations():
    """`--memory auto` runs one configuration per length: their peaks' difference is no per-token cost."""
    auto = [_run("longseq", 65536, peak=124.0, memory_in_use={"offload_checkpoints": False}),
            _run("longseq", 131072, peak=75.0, memory_in_use={"offload_checkpoints": True})]
    assert "llama-8b/sp2/layers=full/longseq" not in summary(auto)["marginal_kib_per_token"]
    same = [dict(r, memory_in_use={"offload_checkpoints": True}) for r in auto]
    assert summary(same)["marginal_kib_per_token"]["llama-8b/sp2/layers=full/longseq"] == {
        "65536-131072": round((75.0 - 124.0) * 2**20 / 32768, 1)}
