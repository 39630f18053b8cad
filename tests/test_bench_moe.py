"""bench/bench_moe.py end to end on CPU at tiny shapes: every family runs, and longseq's loss equals transformers'."""

from __future__ import annotations

import pytest

from bench import bench_moe


@pytest.mark.parametrize("family", sorted(bench_moe.SHAPES))
def test_tiny_run(family, capsys):
    record = bench_moe.main(["--tiny", "--family", family, "--layers", "2", "--lengths", "192", "256"])
    assert [row["tokens"] for row in record["results"]] == [192, 256]
    assert record["loss_diff_vs_unsharded"] < 1e-5 and record["sp"] == 1
    assert all(row["aux_loss"] > 0 and row["tokens_per_s_per_gpu"] > 0 for row in record["results"])
    assert "unsharded transformers" in capsys.readouterr().out
