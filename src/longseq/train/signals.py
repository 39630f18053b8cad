"""Stopping without losing work: signals ask for a checkpoint, and a closed output pipe never kills the run.

Note [Stopping without losing work]
SIGINT (Ctrl-C), SIGTERM (preemption: Slurm, Kubernetes) and SIGHUP (a closed terminal) only set a flag. At the
end of the step every rank learns whether any rank was asked to stop (one all-reduce of the signal number), then
they save a checkpoint together and exit with 128 + the signal's number (130 for Ctrl-C), rank 0 printing one line.
A later stop signal aborts at once, without saving; one within REPEAT_S of the first counts as the same request,
because a launcher that forwards signals (torchrun's agent) delivers the terminal's Ctrl-C a second time:

    torchrun:    terminal ──Ctrl-C──> agent ──SIGINT──> worker    and    terminal ──Ctrl-C──> worker
    --nproc N:   terminal ──Ctrl-C──> launcher ──SIGINT──> worker  (workers in their own session: once)

torchrun's agent also kills its workers --shutdown-timeout seconds (30 by default) after forwarding a signal, and
reports the stop in its own lines and exit status; with steps longer than that, raise the timeout.

Output: `longseq train ... | tee log` and Ctrl-C kill tee first, so the next write to stdout fails with EPIPE (or,
with SIGPIPE at its default action, kills the process before it can save). SIGPIPE is ignored, and stdout and
stderr are wrapped so that the first failed write points the descriptor at /dev/null: later writes, tqdm's and the
interpreter's last flush included, succeed and go nowhere, and training carries on.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from longseq.mesh import Mesh

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REPEAT_S = 2.0


class StopRequests:
    """The signals of Note [Stopping without losing work], as a context manager around the training loop."""

    def __init__(self, on_abort):
        """on_abort(signum) runs when a repeated signal aborts (it should print and exit at once)."""
        self.on_abort = on_abort
        self.signum = 0
        self.first_at = 0.0
        self.handling = handling_stop_signals(self._handle)

    def __enter__(self):
        self.handling.__enter__()
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self.first_at = signum, now
        elif now - self.first_at > REPEAT_S:
            self.on_abort(signum)

    def agreed(self, mesh: Mesh) -> int:
        """The signal any rank received (0: none), the same on every rank: they must save together."""
        if mesh.world_size == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=mesh.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def __exit__(self, *exc) -> None:
        self.handling.__exit__(*exc)


@contextmanager
def handling_stop_signals(handler):
    """Install `handler` for every stop signal, and put the previous handlers back at the end."""
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _SurvivingStream:
    """A text stream whose writes outlive a closed pipe (Note [Stopping without losing work])."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            return self._after_failure(e, lambda: self._stream.write(text))

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._after_failure(e, self._stream.flush)

    def _after_failure(self, error: OSError, retry):
        if error.errno not in (errno.EPIPE, errno.EINVAL):
            raise error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        return retry()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Ignore SIGPIPE and make stdout and stderr survive a closed pipe; idempotent."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SurvivingStream) and _has_descriptor(stream):
            setattr(sys, name, _SurvivingStream(stream))


def _has_descriptor(stream) -> bool:
    try:
        stream.fileno()
    except (OSError, ValueError, AttributeError):  # e.g. pytest's captured streams
        return False
    return True
