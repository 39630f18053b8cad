"""Which package may import which: the layering that keeps each room independent of the ones built on it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "longseq"


def _longseq_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("longseq"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("longseq"))
    return names


def test_parallel_depends_on_nothing_built_on_it():
    """parallel/ never imports memory/, models/ or train/ (the attention cache reaches the ring as an argument)."""
    for path in (SRC / "parallel").glob("*.py"):
        for name in _longseq_imports(path):
            assert not name.startswith(("longseq.memory", "longseq.models", "longseq.train")), (path.name, name)


def test_ring_attention_depends_only_on_its_kernels_placement_and_merge():
    allowed = {"longseq.parallel.kernels", "longseq.parallel.varlen", "longseq.parallel.merge",
               "longseq.parallel.local", "longseq.parallel.window", "longseq.parallel.sinks",
               "longseq.parallel.balance", "longseq.parallel.head_groups", "longseq.parallel.ring_plan",
               "longseq.parallel.sizes"}
    for name in ("ring.py", "ring_plan.py", "kernels.py", "varlen.py", "merge.py", "window.py", "sinks.py",
                 "balance.py", "head_groups.py", "sizes.py"):
        imports = _longseq_imports(SRC / "parallel" / name)
        assert imports <= allowed, name

