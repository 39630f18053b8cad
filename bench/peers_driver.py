"""The driver of bench.run_peers (`python -m bench.run_peers drive ...`): one fresh torchrun per contender and
length, each under a time limit, all under a total budget; collects the records, prints a table and one JSON line."""

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

from bench.peers_contenders import ALST, NAMES
from bench.peers_records import ROOT, VERSION_KEYS, save, table
from bench.report_peers import summary

GRANULE = 65536
"""--search bisects down to this many tokens."""


def driver_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run_peers drive")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs this driver may use (ids 0..gpus-1)")
    parser.add_argument("--first-gpu", type=int, default=0, help="use GPUs first-gpu .. first-gpu+gpus-1")
    parser.add_argument("--sp", type=int, default=4, help="GPUs (= processes, sp degree) per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on disjoint GPUs (they share the host)")
    parser.add_argument("--contenders", nargs="+", default=["longseq", "alst"], choices=NAMES)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072],
                        help="lengths to run; with --search: the first length tried")
    parser.add_argument("--shape", default="llama-8b", choices=["llama-8b", "llama-1b"])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--timed", type=int, default=1, help="timed steps after the warm-up step (0 with --search)")
    parser.add_argument("--timeout", type=float, default=240,
                        help="seconds per run (--search: for the first length, × (length / first)² beyond)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for the whole driver")
    parser.add_argument("--search", action="store_true", help="longest length that fits: double, then bisect at 64K")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, one more under torch.profiler; its top kernels go in the record")
    parser.add_argument("--search-max", type=int, default=1 << 22)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="host cores shared by the runs")
    parser.add_argument("--tag", default="", help="free text stored in every record (e.g. the call's purpose)")
    return parser


class Driver:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget
        self.slots: queue.Queue = queue.Queue()
        per_run = args.sp if args.device == "cuda" else 0
        count = max(1, min(args.jobs, args.gpus // max(per_run, 1)))
        for i in range(count):
            first = args.first_gpu + i * per_run
            self.slots.put([str(g) for g in range(first, first + per_run)])
        self.concurrent = count
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="peers-"))
        self.prebuild = self._prebuild() if args.device == "cuda" and set(args.contenders) & set(ALST) else None

    def _prebuild(self):
        """Compile DeepSpeed's CPU Adam op (JIT, cached) while the other contenders run."""
        code = "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])"
        log = open(self.tmp / "prebuild.log", "w")
        return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=self._env([]))

    def _env(self, gpus: list[str]) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # ALST's advice; longseq sets it too
        threads = max(1, self.args.cpus // (max(self.args.sp, 1) * self.concurrent))
        env["OMP_NUM_THREADS"] = str(threads)  # torchrun would set 1: CPU Adam (both sides) needs the cores
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    def run(self, contender: str, length: int, timed: int, timeout: float | None = None) -> dict:
        """One torchrun on a free slot, within `timeout` s (default --timeout); returns its record (or one describing
        its failure)."""
        args = self.args
        base = dict(bench="peers", contender=contender, shape=args.shape, layers=args.layers or "full",
                    length=length, sp=args.sp, timed_steps=timed, concurrent_runs=self.concurrent, tag=args.tag)
        left = self.deadline - time.monotonic()
        if left < 30:
            return {**base, "status": "skipped", "error": "driver budget spent"}
        if contender in ALST and self.prebuild is not None:
            self.prebuild.wait(timeout=max(1.0, left - 30))
        gpus = self.slots.get()
        try:
            return {**base, **self._launch(contender, length, timed, gpus, min(timeout or args.timeout, left - 5))}
        finally:
            self.slots.put(gpus)

    def _launch(self, contender: str, length: int, timed: int, gpus: list[str], limit: float) -> dict:
        args = self.args
        tag = f"{contender}-{length}-{time.monotonic_ns()}"
        records, log_path = self.tmp / f"{tag}.jsonl", self.tmp / f"{tag}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.sp), "-m",
               "bench.run_peers", "--contender", contender, "--lengths", str(length), "--sp", str(args.sp),
               "--shape", args.shape, "--timed", str(timed), "--seed", str(args.seed),
               "--device", args.device, "--records", str(records)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        if args.profile and timed:
            cmd += ["--profile"]
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
        with self.lock:
            self.records.append(record)
            keys = ("contender", "length", "status", "first_step_loss", "peak_gib", "host_peak_gib", "step_s")
            print("peers:", {k: record.get(k) for k in keys}, flush=True)

    def chain(self, contenders: list[str]) -> None:
        """Shortest length first, every contender at it, then the next length; once a contender fails, its longer
        lengths are skipped."""
        failed = {}
        for length in sorted(self.args.lengths):
            for contender in contenders:
                if contender in failed:
                    self.add(dict(bench="peers", contender=contender, length=length, sp=self.args.sp,
                                  shape=self.args.shape, layers=self.args.layers or "full", status="skipped",
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
        self.add(dict(bench="peers", contender=contender, sp=self.args.sp, layers=self.args.layers or "full",
                      status="search", longest_ok=good, shortest_failed=bad, shape=self.args.shape))


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
    if driver.prebuild is not None and driver.prebuild.poll() is None:
        driver.prebuild.kill()
    known = {k: v for r in driver.records if r.get("card") for k, v in r.items() if k in VERSION_KEYS}
    driver.records = [{**known, **r} for r in driver.records]  # failed runs: the card their neighbours saw
    save(driver.records)
    print(table(driver.records), flush=True)
    print(json.dumps({"bench": "peers", "runs": len(driver.records), "logs": str(driver.tmp),
                      **summary(driver.records)}, default=str), flush=True)
