"""`replfs bench failover`: the longest stall a writer sees when the primary is killed
(kill -9) and when it is frozen (SIGSTOP), on a replicated mount; and the resync of a
backup back from a short absence, incremental against full (tools/bench_resync.py).

A writer thread appends 4 KiB to a file on the mount in a loop and records when each
write returned. After a steady period the primary is killed (or stopped); the stall is
the longest gap between two consecutive completed writes in the run. A run without a
fault gives the baseline gap. Each case runs in a fresh cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time


def register(sub) -> None:
    p = sub.add_parser("failover", help="longest writer stall when the primary is killed / frozen")
    p.add_argument("--dir", default=None, help="where to put the clusters (default: a temporary "
                   "directory under the current one)")
    p.add_argument("--seconds", type=float, default=3.0, help="writer time after the fault")
    p.add_argument("--rounds", type=int, default=2, help="runs per case (the worst is reported)")
    p.add_argument("--resync-rounds", type=int, default=3, help="rounds of each resync kind "
                   "(0: skip the resync)")
    p.add_argument("--absence", type=float, default=2.0, help="seconds the backup is away "
                   "in a resync round")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


class Writer(threading.Thread):
    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path = path
        self.times: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        block = b"x" * 4096
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                while not self.stop.is_set():
                    os.write(fd, block)
                    self.times.append(time.monotonic())
            finally:
                os.close(fd)
        except BaseException as exc:       # reported by the benchmark
            self.error = exc

    def longest_gap(self, since: float) -> float:
        ts = [t for t in self.times if t >= since]
        return max((b - a for a, b in zip(ts, ts[1:])), default=float("inf"))


def one_case(base: str, fault: str | None, seconds: float) -> dict:
    from replfs.tools.cluster import start_mounted_cluster
    mnt, cluster, stop = start_mounted_cluster(base, disk_size=32 * 2**20)
    try:
        st = cluster.status()
        primary = st["viewserver"]["groups"]["0"]["primary"]
        w = Writer(os.path.join(mnt, "stream"))
        w.start()
        time.sleep(1.0)
        t_fault = time.monotonic()
        if fault == "kill":
            cluster.signal(primary, signal.SIGKILL)
        elif fault == "stop":
            cluster.signal(primary, signal.SIGSTOP)
        time.sleep(seconds)
        w.stop.set()
        w.join(30)
        if fault == "stop":
            cluster.signal(primary, signal.SIGCONT)
        if w.error is not None:
            raise RuntimeError(f"the writer failed: {w.error}")
        before = [t for t in w.times if t < t_fault]
        return dict(fault=fault or "none", stall=w.longest_gap(t_fault - 0.5),
                    writes=len(w.times),
                    rate_before=len(before) / 1.0)
    finally:
        stop()


def run(args) -> int:
    base = args.dir or tempfile.mkdtemp(prefix="replfs-bench-failover-", dir=os.getcwd())
    rows = []
    try:
        for fault in (None, "kill", "stop"):
            worst = None
            for r in range(args.rounds):
                d = os.path.join(base, f"{fault or 'none'}-{r}")
                res = one_case(d, fault, args.seconds)
                shutil.rmtree(d, ignore_errors=True)
                if worst is None or res["stall"] > worst["stall"]:
                    worst = res
            rows.append(worst)
        resync = None
        if args.resync_rounds > 0:
            from replfs.tools.bench_resync import measure
            resync = measure(os.path.join(base, "resync"), args.resync_rounds, args.absence)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(rows if resync is None else rows + [dict(resync=resync)], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"replfs bench failover: longest stall of a 4 KiB-append writer "
                    f"(worst of {args.rounds} runs; goal <= 1 s)")
    for col in ("fault on the primary", "longest stall", "writes/s before", "goal met"):
        t.add_column(col)
    for row in rows:
        t.add_row({"none": "none (baseline)", "kill": "kill -9", "stop": "SIGSTOP"}[row["fault"]],
                  f"{row['stall'] * 1000:.0f} ms", f"{row['rate_before']:.0f}",
                  "-" if row["fault"] == "none" else ("yes" if row["stall"] <= 1.0 else "NO"))
    Console().print(t)
    if resync is not None:
        print_resync(Console(), resync, args)
    return 0


def print_resync(console, resync: dict, args) -> None:
    from rich.table import Table
    t = Table(title=f"resync of a backup away {args.absence:g} s under a writer (median of "
                    f"{args.resync_rounds} interleaved rounds each; full: its position "
                    f"forgotten, as a wiped replica's)")
    for col in ("transfer", "blocks sent", "of allocated", "seconds", "blocks / full",
                "time / full"):
        t.add_column(col)
    for kind in ("incremental", "full"):
        r = resync[kind]
        ratio = resync["ratio"] if kind == "incremental" else dict(blocks=1.0, seconds=1.0)
        t.add_row(kind, f"{r['blocks']:.0f}", f"{r['allocated']:.0f}", f"{r['seconds']:.3f}",
                  f"{ratio['blocks']:.3f}x", f"{ratio['seconds']:.2f}x")
    console.print(t)
