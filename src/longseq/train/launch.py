"""`longseq train --nproc N`: start N local worker processes and watch them (joining a process group is
mesh.init_distributed).

The workers get torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...) but run in their own
session, so a Ctrl-C at the terminal reaches only this launcher, which forwards every SIGINT, SIGTERM and SIGHUP
exactly once to each worker (Note [Stopping without losing work]): the first makes them save and exit together,
a later one aborts. A worker that fails stops the others at once (within POLL_S), so a dying rank never leaves its
peers hanging in a collective. Exits that every rank makes together (a configuration error: 2; stopped by a signal:
128 + its number) give the others GRACE_S to exit by themselves, so that rank 0 can print the one message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from longseq.train.signals import STOP_SIGNALS, handling_stop_signals

POLL_S = 0.05
GRACE_S = 10.0
TOGETHER = {2} | {128 + s for s in STOP_SIGNALS}


def spawn_local(nproc: int, argv: list[str]) -> int:
    """Run `longseq <argv>` in `nproc` local processes; returns the exit code of the run."""
    port = _free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    workers = [subprocess.Popen([sys.executable, "-m", "longseq.cli", *argv], env=_worker_env(rank, nproc, port,
                                                                                                threads),
                                start_new_session=True) for rank in range(nproc)]
    with handling_stop_signals(_forward_to(workers)):
        return _watch(workers)


def _worker_env(rank: int, nproc: int, port: int, threads: str) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", threads)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch(workers: list[subprocess.Popen]) -> int:
    """Wait for every worker; the first failure decides the exit code and stops the rest."""
    while True:
        codes = [w.poll() for w in workers]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop_the_rest(workers, grace=GRACE_S if failed[0] in TOGETHER else 0.0)
            return _exit_code(workers, failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(POLL_S)


def _stop_the_rest(workers: list[subprocess.Popen], grace: float) -> None:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(w.poll() is None for w in workers):
        time.sleep(POLL_S)
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
        worker.wait()


def _exit_code(workers: list[subprocess.Popen], first: int) -> int:
    """Rank 0's code when it ended by itself (it printed the message), else the first failure's; a worker killed
    by a signal counts as 128 + its number, as a shell reports it."""
    code = workers[0].returncode
    chosen = code if code not in (None, 0, -signal.SIGKILL) else first
    return 128 - chosen if chosen < 0 else chosen


def _forward_to(workers: list[subprocess.Popen]):
    """A signal handler that forwards each stop signal the launcher gets to every worker still running."""
    def forward(signum, frame) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    return forward
