"""`replfs bench fs`: the same workloads on a replfs mount and, in the same run, on a
minimal pyfuse3 passthrough filesystem over the same disk (the floor any Python FUSE
filesystem pays). Figures are reported as ratios to the passthrough."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from replfs.raid import parse_size
from replfs.tools.mountpoints import unmount, wait_mounted

MiB = 1 << 20


def register(sub) -> None:
    p = sub.add_parser("fs", help="filesystem workloads: replfs vs a pyfuse3 passthrough")
    p.add_argument("--size", default="256M", help="sequential file size (default 256M)")
    p.add_argument("--files", type=int, default=2000, help="small files (default 2000)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir in /var/tmp)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.set_defaults(func=cmd_bench_fs)


def _stop(proc, mnt: Path) -> None:
    unmount(mnt)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    unmount(mnt)


@contextmanager
def replfs_local(base: Path, disk_size: int):
    data, mnt = base / "replfs-data", base / "replfs-mnt"
    mnt.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "replfs.tools.cli", "mkfs", str(data), "--disks", "4",
                    "--size", str(disk_size)], check=True, capture_output=True)
    log = open(base / "replfs-mount.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "replfs.tools.cli", "mount", "--local",
                             str(data), str(mnt)], stdout=log, stderr=log)
    try:
        wait_mounted(mnt, lambda: proc.poll() is None, "the replfs mount")
        yield mnt
    finally:
        _stop(proc, mnt)
        log.close()


@contextmanager
def passthrough(base: Path):
    src, mnt = base / "pt-src", base / "pt-mnt"
    src.mkdir(parents=True)
    mnt.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "replfs.tools.passthrough", str(src), str(mnt)])
    try:
        wait_mounted(mnt, lambda: proc.poll() is None, "the passthrough mount")
        yield mnt
    finally:
        _stop(proc, mnt)


def _drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def run_workloads(mnt: Path, size: int, nfiles: int) -> dict:
    """The workloads; returns {name: value} (MB/s, ops/s or ms)."""
    out = {}
    buf = os.urandom(MiB)
    f = mnt / "seq"
    t = time.perf_counter()
    fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(size // MiB):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    out["seq write + fsync (MB/s)"] = size / MiB / (time.perf_counter() - t)
    _drop_caches()
    t = time.perf_counter()
    fd = os.open(f, os.O_RDONLY)
    while os.read(fd, MiB):
        pass
    os.close(fd)
    out["seq read (MB/s)"] = size / MiB / (time.perf_counter() - t)
    os.unlink(f)

    a, b = mnt / "a", mnt / "b"
    a.mkdir()
    b.mkdir()
    small = os.urandom(4096)
    t = time.perf_counter()
    for i in range(nfiles):
        fd = os.open(a / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, small)
        os.close(fd)
    out["create 4 KiB (ops/s)"] = nfiles / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(nfiles):
        os.stat(a / f"f{i}")
    out["stat (ops/s)"] = nfiles / (time.perf_counter() - t)
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        n = len(os.listdir(a))
    assert n == nfiles
    out["readdir (entries/s)"] = reps * nfiles / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(nfiles):
        os.rename(a / f"f{i}", b / f"f{i}")
    out["rename across dirs (ops/s)"] = nfiles / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(nfiles):
        os.unlink(b / f"f{i}")
    out["unlink (ops/s)"] = nfiles / (time.perf_counter() - t)
    lat = []
    fd = os.open(mnt / "sync", os.O_CREAT | os.O_WRONLY, 0o644)
    for i in range(100):
        os.pwrite(fd, small, i * 4096)
        t = time.perf_counter()
        os.fsync(fd)
        lat.append(time.perf_counter() - t)
    os.close(fd)
    out["fsync latency (ms, median)"] = statistics.median(lat) * 1000
    return out


GOALS = {
    "create 4 KiB (ops/s)": 0.5,
    "rename across dirs (ops/s)": 0.5,
    "unlink (ops/s)": 0.5,
    "stat (ops/s)": 1.0,
}


def cmd_bench_fs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    size = parse_size(args.size)
    base = Path(tempfile.mkdtemp(prefix="replfs-bench-", dir=args.dir or "/var/tmp"))
    console = Console()
    try:
        results = {}
        with passthrough(base) as mnt:
            console.print("[bold]passthrough[/]: running…")
            results["passthrough"] = run_workloads(mnt, size, args.files)
        with replfs_local(base, max(64 * MiB, size * 2 // 3)) as mnt:
            console.print("[bold]replfs (local)[/]: running…")
            results["replfs"] = run_workloads(mnt, size, args.files)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table = Table(title=f"replfs bench fs ({args.size} sequential, {args.files} small files)")
    table.add_column("workload")
    table.add_column("passthrough", justify="right")
    table.add_column("replfs local", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("goal", justify="right")
    for k, pv in results["passthrough"].items():
        rv = results["replfs"][k]
        ratio = (pv / rv) if "latency" in k else (rv / pv)
        goal = GOALS.get(k)
        if k.startswith("seq write"):
            goal_s = ">= 100 MB/s"
        else:
            goal_s = f">= {goal}x" if goal else ""
        table.add_row(k, f"{pv:,.1f}", f"{rv:,.1f}", f"{ratio:.2f}x", goal_s)
    console.print(table)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
