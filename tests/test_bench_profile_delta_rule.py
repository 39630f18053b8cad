"""bench/profile_delta_rule.py end to end on CPU at tiny shapes: per token, the saved bytes and the backward's
allocations stay the same as the length doubles."""

from __future__ import annotations

import pytest

from bench import profile_delta_rule


def test_tiny_run(capsys):
    record = profile_delta_rule.main(["--tiny"])
    short, long = record["rows"]
    assert (short["tokens"], long["tokens"]) == (256, 512)
    assert long["saved_kib"] == pytest.approx(short["saved_kib"], rel=0.05)
    assert long["backward_alloc_kib"] == pytest.approx(short["backward_alloc_kib"], rel=0.1)
    assert "bwd alloc KiB" in capsys.readouterr().out
