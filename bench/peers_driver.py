"""The driver of bench.run_peers (`python -m bench.run_peers drive ...`): the card's ideal step first, then one fresh
torchrun per contender, length and placement, each under a time limit, all under a total budget; collects the records,
prints a table and one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.peers_registry import ALST, NAMES, PLACEMENTS, unavailable
from bench.peers_ideal import with_ideal
from bench.peers_records import ROOT, VERSION_KEYS, add_run_options, run_argv, save, table, why_unavailable
from bench.report_peers import summary

GRANULE = 65536
"""--search bisects down to this many tokens."""


def driver_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run_peers drive")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs this driver may use (ids first-gpu ..); with "
                        "--device cpu: how many runs --jobs may start at once")
    parser.add_argument("--first-gpu", type=int, default=0, help="use GPUs first-gpu .. first-gpu+gpus-1")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on disjoint GPUs (they share the host)")
    parser.add_argument("--contenders", nargs="+", default=["longseq", "alst"], choices=NAMES)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072],
                        help="lengths to run; with --search: the first length tried")
    parser.add_argument("--placement", default="auto", choices=["auto", "gpu", "optimizer", "all"],
                        help="auto: each contender's least offloaded placement that fits (next one after an OOM)")
    parser.add_argument("--timeout", type=float, default=240,
                        help="seconds per run (--search: for the first length, × (length / first)² beyond)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for the whole driver")
    parser.add_argument("--search", action="store_true", help="longest length that fits: double, then bisect at 64K")
    parser.add_argument("--search-max", type=int, default=1 << 22)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="host cores shared by the runs")
    parser.add_argument("--tag", default="", help="free text stored in every record (e.g. the call's purpose)")
    parser.add_argument("--code", default=None, help="the code's commit, stored in every record (default: git's "
                        "HEAD where the tree has .git; the GPU machines' copies do not: pass it)")
    parser.add_argument("--call", type=int, default=None, help="the device call's number (docs/log.md), stored")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "peers.jsonl"),
                        help="append the records here (and to $OUT/peers.jsonl when $OUT is set)")
    add_run_options(parser)
    return parser


def code_version() -> str:
    """`git rev-parse --short HEAD` of this tree, with +dirty when it has changes; "unknown" without git."""
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Driver:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget
        self.slots: queue.Queue = queue.Queue()
        per_run = args.sp if args.device == "cuda" else 0
        count = max(1, min(args.jobs, args.gpus // max(per_run, 1)))
        self.gpu_sets = [[str(args.first_gpu + i * per_run + g) for g in range(per_run)] for i in range(count)]
        for gpus in self.gpu_sets:
            self.slots.put(gpus)
        self.concurrent = count
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="peers-"))
        self.code = args.code or code_version()
        self.ladder_start: dict[str, int] = {}
        self.cpu_adam_built = False
        self.calibration, self.calibration_error = (None, "--search times no step") if args.search else \
            self._calibrate()

    def build_cpu_adam(self, limit: float) -> None:
        """Compile DeepSpeed's CPU Adam op (JIT, cached) once, before the first ALST run that offloads its optimizer
        state: outside that run's time limit, and not beside another contender's timed steps."""
        if self.cpu_adam_built:
            return
        code = ("import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; "
                "DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])")
        with open(self.tmp / "cpu_adam_build.log", "w") as log:
            try:
                subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=self._env([]),
                               timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                log.write("build ran past the driver's budget; the ALST run will build it itself\n")
        self.cpu_adam_built = True

    def _calibrate(self) -> tuple[dict | None, str | None]:
        """The card's attention and GEMM speeds at the run's shapes (bench.peers_ideal), on the first slot's first
        GPU, before any contender runs: ({length: ideal}, None) or (None, why it failed)."""
        args, out = self.args, self.tmp / "ideal.json"
        cmd = [sys.executable, "-m", "bench.peers_ideal", "--shape", args.shape, "--sp", str(args.sp), "--device",
               args.device, "--out", str(out), "--lengths", *map(str, args.lengths)]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        gpus = self.gpu_sets[0][:1]
        try:
            run = subprocess.run(cmd, cwd=ROOT, env=self._env(gpus), capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            return None, "calibration ran past 240 s"
        if run.returncode != 0 or not out.exists():
            return None, f"calibration failed: {run.stderr[-600:]}"
        found = json.loads(out.read_text())
        print("peers: ideal step (Note [Ideal step]):", json.dumps(found), flush=True)
        return found, None

    def _env(self, gpus: list[str]) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # ALST's advice; longseq sets it too
        threads = max(1, self.args.cpus // (max(self.args.sp, 1) * self.concurrent))
        env["OMP_NUM_THREADS"] = str(threads)  # torchrun would set 1: CPU Adam (both sides) needs the cores
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    def base(self, contender: str, length: int | None, **extra) -> dict:
        """What every record of this driver states, before its run says more."""
        args = self.args
        return dict(bench="peers", contender=contender, shape=args.shape, layers=args.layers or "full", length=length,
                    sp=args.sp, optimizer=args.optimizer, concurrent_runs=self.concurrent, tag=args.tag,
                    code=self.code, device_call=args.call, **extra)

    def placements(self, contender: str) -> list[str]:
        """The placements to try for this contender, in order: from the one that last fitted (a longer length needs
        no less offload) to its most offloaded; or only --placement when it is not auto."""
        ladder = list(PLACEMENTS[contender])
        if self.args.placement != "auto":
            return [self.args.placement]
        return ladder[self.ladder_start.get(contender, 0):]

    def run(self, contender: str, length: int, timed: int, timeout: float | None = None) -> dict:
        """The contender at this length at its best: each placement in turn until one is not out of GPU memory (the
        ones that were are recorded too); returns the last run's record. A contender that cannot run here is not
        launched: its record says why."""
        reasons = unavailable(contender, self.args)
        if reasons:
            return self.base(contender, length, status="unavailable", error=why_unavailable(contender, reasons))
        tried = []
        for placement in self.placements(contender):
            if placement not in PLACEMENTS[contender]:
                return self.base(contender, length, placement=placement, status="unavailable",
                                 error=f"{contender} has no placement {placement!r}; it takes "
                                       f"{list(PLACEMENTS[contender])} (or --placement auto).")
            tried.append(placement)
            record = {**self.run_once(contender, length, timed, placement, timeout), "placements_tried": tried[:]}
            if record["status"] != "oom" or placement == PLACEMENTS[contender][-1] or self.args.placement != "auto":
                break
            self.add(record)
        if record["status"] == "ok":
            self.ladder_start[contender] = PLACEMENTS[contender].index(record["placement"])
        return record

    def run_once(self, contender: str, length: int, timed: int, placement: str, timeout: float | None) -> dict:
        """One torchrun on a free slot, within `timeout` s (default --timeout); returns its record (or one describing
        its failure)."""
        base = self.base(contender, length, timed_steps=timed, placement=placement)
        left = self.deadline - time.monotonic()
        if left < 30:
            return {**base, "status": "skipped", "error": "driver budget spent"}
        if contender in ALST and placement != "gpu" and self.args.device == "cuda":
            self.build_cpu_adam(left - 30)
            left = self.deadline - time.monotonic()
        gpus = self.slots.get()
        try:
            limit = min(timeout or self.args.timeout, left - 5)
            return {**base, **self._launch(contender, length, timed, placement, gpus, limit)}
        finally:
            self.slots.put(gpus)

    def _launch(self, contender: str, length: int, timed: int, placement: str, gpus: list[str], limit: float) -> dict:
        args = self.args
        tag = f"{contender}-{length}-{placement}-{time.monotonic_ns()}"
        records, log_path = self.tmp / f"{tag}.jsonl", self.tmp / f"{tag}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.sp), "-m",
               "bench.run_peers", "--contender", contender, "--lengths", str(length), "--records", str(records),
               *run_argv(args, placement), "--timed", str(timed)]
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self._env(gpus), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                code = None
                _kill(proc)
        wall = time.monotonic() - start
        found = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
        if found:
            return {**found[-1], "wall_s": wall, "gpus_used": ",".join(gpus)}
        errors = sorted(self.tmp.glob(f"{tag}.jsonl.rank*.err"))
        tail = log_path.read_text()[-1500:]
        if errors:
            first = json.loads(errors[0].read_text())
            return {**first, "wall_s": wall, "log_tail": tail}
        status = "timeout" if code is None else ("killed" if code < 0 else "error")
        why = f"no record; {'ran past ' + str(int(limit)) + ' s' if code is None else 'exit code ' + str(code)}"
        return dict(status=status, error=why + (" (SIGKILL: host out of memory?)" if code == -9 else ""),
                    wall_s=wall, log_tail=tail)

    def add(self, record: dict) -> None:
        record = with_ideal(record, self.calibration)
        with self.lock:
            self.records.append(record)
            keys = ("contender", "length", "placement", "status", "first_step_loss", "peak_gib", "host_peak_gib",
                    "step_s", "pct_of_ideal")
            print("peers:", {k: record.get(k) for k in keys}, flush=True)

    def chain(self, contenders: list[str]) -> None:
        """Shortest length first, every contender at it, then the next length; once a contender fails, its longer
        lengths are skipped."""
        failed = {}
        for length in sorted(self.args.lengths):
            for contender in contenders:
                if contender in failed:
                    self.add(self.base(contender, length, status="skipped",
                                       error=f"a shorter length failed ({failed[contender]})"))
                    continue
                record = self.run(contender, length, self.args.timed)
                self.add(record)
                if record["status"] != "ok":
                    failed[contender] = record["status"]

    def search(self, contender: str) -> None:
        """Double from the first length until a run fails, then bisect at 64K granularity; one step per probe. A probe
        may take --timeout × (length / first length)² seconds: at long lengths attention's quadratic work dominates."""
        first = self.args.lengths[0]
        good, bad, length = None, None, first
        while length <= self.args.search_max and time.monotonic() < self.deadline - 30:
            timeout = self.args.timeout * max(1.0, (length / first) ** 2)
            record = {**self.run(contender, length, 0, timeout), "search": True}
            self.add(record)
            if record["status"] in ("skipped", "timeout"):  # a slow step says nothing about memory
                break
            if record["status"] == "ok":
                good = length
            else:
                bad = length
            if bad is None:
                length *= 2
                continue
            low = good or 0
            if bad - low <= GRANULE:
                break
            length = (low + bad) // 2 // GRANULE * GRANULE
            if length <= low:
                break
        self.add(self.base(contender, None, status="search", longest_ok=good, shortest_failed=bad))


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def drive(argv: list[str]) -> None:
    args = driver_parser().parse_args(argv)
    driver = Driver(args)
    if args.search:
        work = [(driver.search, (c,)) for c in args.contenders]
    elif driver.concurrent == 1:
        work = [(driver.chain, (args.contenders,))]  # one run at a time, length by length
    else:
        work = [(driver.chain, ([c],)) for c in args.contenders]  # one chain per contender, sharing the slots
    threads = [threading.Thread(target=fn, args=a) for fn, a in work]
    for thread in threads:
        thread.start()
        if driver.concurrent == 1:
            thread.join()
    for thread in threads:
        thread.join()
    known = {k: v for r in driver.records if r.get("card") for k, v in r.items() if k in VERSION_KEYS}
    driver.records = [{**known, **r} for r in driver.records]  # failed runs: the card their neighbours saw
    save(driver.records, args.results)
    print(table(driver.records), flush=True)
    print(json.dumps({"bench": "peers", "runs": len(driver.records), "logs": str(driver.tmp),
                      "ideal_error": driver.calibration_error, **summary(driver.records)}, default=str), flush=True)
