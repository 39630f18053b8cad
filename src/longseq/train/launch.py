"""Starting N local processes for `longseq train --nproc N` (joining a process group is mesh.init_distributed).

Failures: under torchrun a worker that exits non-zero makes the agent stop the others (no hang); `spawn_local` runs
torchrun itself, so the demo gets the same behaviour.
"""

from __future__ import annotations

import os
import subprocess
import sys


def spawn_local(nproc: int, argv: list[str]) -> int:
    """Run `longseq <argv>` as `torchrun --standalone --nproc-per-node nproc`; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "longseq.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    process = subprocess.Popen(command, env=env)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # the workers got the same Ctrl-C and are saving a checkpoint: wait for them
            continue
