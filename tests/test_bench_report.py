"""The peer report's arithmetic (bench/report_peers.py) on made-up records: shapes never mix, and a ratio of longest
lengths appears only where ALST ran out of memory."""

from __future__ import annotations

from bench.report_peers import summary


def _run(contender, length, status="ok", shape="llama-8b", tokens=1000.0, peak=10.0, loss=1.0):
    return dict(contender=contender, shape=shape, sp=2, layers="full", length=length, status=status, timed_steps=1,
                tokens_per_s_per_gpu=tokens, peak_gib=peak, first_step_loss=loss)


def test_ratios_per_shape_and_longest_only_where_alst_ran_out_of_memory():
    records = [_run("longseq", 65536, tokens=1500.0), _run("alst", 65536),
               _run("longseq", 65536, shape="llama-1b", tokens=9000.0), _run("alst", 65536, shape="llama-1b"),
               _run("longseq", 131072, peak=12.0), _run("alst", 131072, status="timeout"),
               _run("longseq", 262144, peak=16.0)]
    eight, one = (summary(records)["ratios_longseq_over_alst"][f"llama-{s}/sp2/layers=full"] for s in ("8b", "1b"))
    assert eight["tokens_per_s_ratio@65536"] == 1.5 and one["tokens_per_s_ratio@65536"] == 9.0
    assert eight["marginal_kib_per_token_longseq"] == {"131072-262144": 4 * 2**20 / 65536}
    assert eight["longest_ok_alst"] == 65536 and "longest_ratio" not in eight  # a timeout bounds no memory
    records.append(_run("alst", 196608, status="oom"))
    eight = summary(records)["ratios_longseq_over_alst"]["llama-8b/sp2/layers=full"]
    assert eight["out_of_memory_alst"] == 196608 and eight["longest_ratio"] == 4.0
    assert eight["longest_ratio_is"].startswith("a lower bound")
