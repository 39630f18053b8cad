"""Which package may import which: the layering that keeps each room independent of the ones built on it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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


def _heavy_modules_after(code: str) -> list[str]:
    """Which of torch and transformers a fresh interpreter has imported once it ran `code`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC.parent), os.environ.get("PYTHONPATH")])))
    probe = f"{code}\nimport sys\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return ast.literal_eval(run.stdout.splitlines()[-1])


def test_plan_for_a_named_shape_imports_neither_torch_nor_transformers():
    """`longseq plan` runs before a GPU is rented, and answers for a named shape without torch: the plan package
    reads the kernels' sizes from parallel/sizes.py, and `import longseq` imports its public names on first use."""
    run_plan = "from longseq import cli\ncli.main(['plan', '--shape', 'llama-8b', '--length', '65536', '--json'])"
    assert _heavy_modules_after(run_plan) == []
    assert _heavy_modules_after("from longseq import cli\ncli.main(['--help'])") == []


def test_public_names_import_on_first_use():
    code = ("import longseq\nassert longseq.MemoryConfig().tiled_mlp and callable(longseq.apply)\n"
            "assert set(longseq.__all__) <= set(dir(longseq))\n"
            "try:\n    longseq.no_such_name\nexcept AttributeError as error:\n    assert 'no_such_name' in str(error)\n"
            "else:\n    raise AssertionError('no AttributeError')")
    assert _heavy_modules_after(code) == ["torch", "transformers"]
