"""bench/ as a package: its modules import each other without circles, and timings keep their spread."""

from __future__ import annotations

import ast
import time
from pathlib import Path

from bench.common import timed

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_imports(path: Path) -> set[str]:
    """The bench modules `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bench."))
    return found


def test_bench_modules_import_without_circles():
    graph = {p.stem: bench_imports(p) for p in BENCH.glob("*.py")}
    assert graph["peers_driver"] and graph["report_peers"]  # the walk sees imports at all

    def reach(start: str, node: str, seen: set) -> bool:
        for nxt in graph.get(node, ()):
            if nxt == start or (nxt not in seen and reach(start, nxt, seen | {nxt})):
                return True
        return False

    circles = sorted(name for name in graph if reach(name, name, {name}))
    assert not circles, f"modules on an import circle: {circles}"


def test_timed_reports_each_call():
    pauses = iter([0.2, 0.001, 0.05])
    timing = timed(lambda: time.sleep(next(pauses)), repeats=3)
    assert len(timing.seconds) == 3
    assert timing.min < 0.05 <= timing.median < 0.2 <= max(timing.seconds)
    assert timing.fields("step") == {"step_s": timing.median, "step_s_min": timing.min, "step_repeats": 3}
