"""`replfs bench failover`: the longest stall a writer sees when the primary is killed
(kill -9) and when it is frozen (SIGSTOP), when the active view server is killed, and when
a primary is killed right after it, on a replicated mount; and the resync of a backup back
from a short absence, incremental against full (tools/bench_resync.py).

A writer thread appends 4 KiB to a file on the mount in a loop and records when each
write returned. After a steady period the fault comes; the stall is the longest gap
between two consecutive completed writes in the run. A run without a fault gives the
baseline gap. Each case runs in a fresh cluster; the view server cases in one with three
view server processes on a real three-member etcd started here (tools/etcdlocal.py), and
are skipped, with the reason in the table, where etcd is not installed.
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
    p.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS),
                   help="which cases to run (default: all; vs and vs+kill need etcd)")
    p.add_argument("--etcd-election-timeout", type=int, default=500, metavar="MS",
                   help="the etcd members' --election-timeout in ms (default 500: etcd then "
                   "grants 1 s leases, so a standby view server takes over after about 1 s; "
                   "0: etcd's own default, 1000 ms and 2 s leases)")
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

    def flowing(self, within: float = 0.2) -> bool:
        """A write returned within the last `within` s."""
        return bool(self.times) and self.times[-1] > time.monotonic() - within

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time between two writes returning, from `since` to `until` (a
        write still hanging at `until` counts up to then)."""
        ts = [t for t in self.times if since <= t <= until] + [until]
        return max((b - a for a, b in zip(ts, ts[1:])), default=float("inf"))


# fault -> (the table's words, goal on the longest stall in s, needs etcd, what bounds it)
FAULTS = {
    "none": ("none (baseline)", None, False, "the writer's own pace"),
    "kill": ("kill -9 of the primary", 0.2, False,
             "its death seen (closed connections, else dead_pings x ping_interval "
             "missed pings = 0.5 s), then the backup made primary"),
    "stop": ("SIGSTOP of the primary", 1.0, False,
             "dead_pings x ping_interval missed pings (0.5 s), then the backup made primary"),
    "vs": ("kill -9 of the active view server", 1.0, True,
           "nothing: the backup renews its primary's lease while no view server answers "
           "(a standby sees the death -- its connection closed, its address refusing -- "
           "ends the lease in etcd and takes over, ~0.1 s)"),
    "vs+kill": ("kill -9 of the active view server, then of a primary", 2.0, True,
                "the standby's takeover (~0.1 s), then dead_pings x ping_interval missed "
                "pings after it (0.5 s)"),
}


def active_viewserver(cluster) -> str:
    return (cluster.status(timeout=1.0).get("viewserver") or {}).get("name") or ""


def one_case(base: str, fault: str, seconds: float, election_timeout: int = 0) -> dict:
    if not FAULTS[fault][2]:
        return fault_run(base, fault, seconds, {})
    from replfs.tools.etcdlocal import etcd_cluster
    with etcd_cluster(os.path.join(base, "etcd"), 3,
                      election_timeout=election_timeout or None) as etcd:
        return fault_run(base, fault, seconds, dict(viewservers=3, etcd=etcd.endpoints))


def fault_run(base: str, fault: str, seconds: float, vs: dict) -> dict:
    from replfs.tools.cluster import start_mounted_cluster
    mnt, cluster, stop = start_mounted_cluster(base, disk_size=32 * 2**20, **vs)
    try:
        st = cluster.status()
        primary = st["viewserver"]["groups"]["0"]["primary"]
        active = st["viewserver"].get("name", "")
        w = Writer(os.path.join(mnt, "stream"))
        w.start()
        time.sleep(1.0)
        t_fault = time.monotonic()
        extra = {}
        if fault in ("vs", "vs+kill"):
            cluster.signal(active, signal.SIGKILL)
        if fault in ("kill", "vs+kill"):
            cluster.signal(primary, signal.SIGKILL)
        elif fault == "stop":
            cluster.signal(primary, signal.SIGSTOP)
        if fault in ("vs", "vs+kill"):
            # the takeover: until another view server process answers as the active one
            deadline = t_fault + 60
            while active_viewserver(cluster) in ("", active):
                if time.monotonic() > deadline:
                    raise RuntimeError("no standby view server took over within 60 s")
                time.sleep(0.05)
            extra["takeover"] = time.monotonic() - t_fault
        time.sleep(max(0.0, t_fault + seconds - time.monotonic()))
        deadline = time.monotonic() + 60        # the stall ended: the writer goes again
        while not w.flowing() and w.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        t_end = time.monotonic()
        w.stop.set()
        w.join(30)
        if fault == "stop":
            cluster.signal(primary, signal.SIGCONT)
        if w.error is not None:
            raise RuntimeError(f"the writer failed: {w.error}")
        before = [t for t in w.times if t < t_fault]
        return dict(fault=fault, stall=w.longest_gap(t_fault - 0.5, t_end),
                    writes=len(w.times), rate_before=len(before) / 1.0, **extra)
    finally:
        stop()


def worst_of(base: str, fault: str, rounds: int, seconds: float,
             election_timeout: int = 0) -> dict:
    """The run with the longest stall (with the longest takeover, its worst too); or
    {fault, skipped: why} where etcd is missing."""
    from replfs.tools.etcdlocal import EtcdMissing
    worst = None
    takeover = 0.0
    for r in range(rounds):
        d = os.path.join(base, f"{fault}-{r}")
        try:
            res = one_case(d, fault, seconds, election_timeout)
        except EtcdMissing as e:
            return dict(fault=fault, skipped=str(e))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        takeover = max(takeover, res.get("takeover", 0.0))
        if worst is None or res["stall"] > worst["stall"]:
            worst = res
    if "takeover" in worst:
        worst["takeover"] = takeover
    return worst


def run(args) -> int:
    base = args.dir or tempfile.mkdtemp(prefix="replfs-bench-failover-", dir=os.getcwd())
    try:
        rows = [worst_of(base, f, args.rounds, args.seconds, args.etcd_election_timeout)
                for f in args.faults]
        resync = None
        if args.resync_rounds > 0:
            from replfs.tools.bench_resync import measure
            resync = measure(os.path.join(base, "resync"), args.resync_rounds, args.absence)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    for row in rows:
        goal = FAULTS[row["fault"]][1]
        row["goal"] = goal
        if goal is not None and "stall" in row:
            row["met"] = row["stall"] <= goal
    if args.json:
        print(json.dumps(rows if resync is None else rows + [dict(resync=resync)], indent=2))
        return 0
    from rich.console import Console
    print_stalls(Console(), rows, args)
    if resync is not None:
        print_resync(Console(), resync, args)
    return 0


def print_stalls(console, rows: list[dict], args) -> None:
    from rich.table import Table
    bounds = "; ".join(f"{FAULTS[r['fault']][0]}: {FAULTS[r['fault']][3]}" for r in rows)
    et = args.etcd_election_timeout
    etcd = ("; the view server cases: 3 view servers on a 3-member etcd "
            f"(--election-timeout {et or 'default'}: a hung view server's lease lasts "
            f"{'1 s' if et and et <= 500 else '2 s'})"
            if any(FAULTS[r["fault"]][2] for r in rows) else "")
    t = Table(title=f"replfs bench failover: longest stall of a 4 KiB-append writer "
                    f"(worst of {args.rounds} runs{etcd})",
              caption=f"What bounds each row -- {bounds}.")
    for col in ("fault", "longest stall", "goal", "standby took over", "writes/s before",
                "goal met"):
        t.add_column(col)
    for row in rows:
        label, goal = FAULTS[row["fault"]][:2]
        if "skipped" in row:
            t.add_row(label, f"skipped: {row['skipped']}", "", "", "", "-")
            continue
        t.add_row(label, f"{row['stall'] * 1000:.0f} ms",
                  "-" if goal is None else f"<= {goal:g} s",
                  f"{row['takeover'] * 1000:.0f} ms" if "takeover" in row else "-",
                  f"{row['rate_before']:.0f}",
                  "-" if goal is None else ("yes" if row["met"] else "NO"))
    console.print(t)


def print_resync(console, resync: dict, args) -> None:
    from rich.table import Table
    t = Table(title=f"resync of a backup away {args.absence:g} s under a writer (median of "
                    f"{args.resync_rounds} interleaved rounds each; full: its position "
                    f"forgotten, as a wiped replica's; failover: the primary killed instead, "
                    f"and back as the backup of the one that took over)")
    for col in ("transfer", "blocks sent", "of allocated", "seconds", "blocks / full",
                "time / full"):
        t.add_column(col)
    labels = {"incremental": "incremental", "full": "full",
              "failover": "old primary back after a failover (union of the maps)"}
    ratios = {"incremental": resync["ratio"], "full": dict(blocks=1.0, seconds=1.0),
              "failover": resync.get("ratio_failover")}
    for kind, label in labels.items():
        r, ratio = resync.get(kind), ratios[kind]
        if r is None or ratio is None:
            continue
        t.add_row(label, f"{r['blocks']:.0f}", f"{r['allocated']:.0f}", f"{r['seconds']:.3f}",
                  f"{ratio['blocks']:.3f}x", f"{ratio['seconds']:.2f}x")
    console.print(t)
