"""`replfs bench raid`: the array's throughput as ratios to one plain image file.

In one run, on the same filesystem: plain sequential write and read of SIZE bytes to one
file (the baseline), then the array's sequential write (through the async BlockDevice API,
flush at the end), sequential read, degraded read (one disk failed), rebuild of that disk
and scrub. Writes are timed up to and including their fsync; before every read phase the
files' pages are dropped from the page cache (posix_fadvise DONTNEED after fsync), so
reads come from the disk for the baseline and the array alike.

Ratios: write/read/degraded read against the baseline's write/read MB/s of logical bytes;
rebuild as bytes written to the new disk per second against the baseline write; scrub as
bytes read from all members per second against the baseline read.

The online rebuild (bench_raid_online.py; `--no-online` skips it): in each round, after
the offline phases, disk 1 of a serving primary of a mounted cluster is failed and
rebuilt through the server while a shell workload writes to the mount, at the speed
limits `--speed-min`/`--speed-max`; its bytes per second go against the same round's raw
write.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import trio
from rich.console import Console
from rich.table import Table

from replfs.raid import create_array, parse_size
from replfs.raid.array import BLOCK_SIZE

BATCH = 4 << 20


def _drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw(path: str, data: memoryview) -> tuple[float, float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t = time.perf_counter()
        for off in range(0, len(data), BATCH):
            os.pwrite(fd, data[off:off + BATCH], off)
        os.fsync(fd)
        tw = time.perf_counter() - t
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        for off in range(0, len(data), BATCH):
            os.pread(fd, BATCH, off)
        tr = time.perf_counter() - t
    finally:
        os.close(fd)
        os.remove(path)
    return tw, tr


def _xor_speeds() -> tuple[float, float]:
    a = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8)
    b = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8)
    t = time.perf_counter()
    for _ in range(50):
        np.bitwise_xor(a, b)
    np_speed = 50 * len(a) / (time.perf_counter() - t)
    ab, bb = a.tobytes(), b.tobytes()
    t = time.perf_counter()
    for _ in range(10):
        (int.from_bytes(ab, "little") ^ int.from_bytes(bb, "little")).to_bytes(len(ab), "little")
    int_speed = 10 * len(ab) / (time.perf_counter() - t)
    return np_speed, int_speed


def _one_round(workdir: str, mv: memoryview, size: int, ndisks: int, chunk: int) -> dict:
    """One measurement of everything; returns seconds and byte counts per phase."""
    raw_w, raw_r = _raw(os.path.join(workdir, "raw.img"), mv)
    disk_size = (size // (ndisks - 1)) + 4 * chunk + (1 << 20)
    adir = os.path.join(workdir, "array")
    arr = create_array(adir, ndisks, disk_size, chunk=chunk)
    paths = [d.path for d in arr.disks]
    nblk = size // BLOCK_SIZE
    per = BATCH // BLOCK_SIZE // arr.geo.data_per_row * arr.geo.data_per_row or \
        arr.geo.data_per_row
    try:
        _drop_cache(paths)

        async def write_all():
            for s in range(0, nblk, per):
                e = min(nblk, s + per)
                await arr.write_blocks({b: mv[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]
                                        for b in range(s, e)})
            await arr.flush()

        async def read_all(check: bool):
            for s in range(0, nblk, per):
                e = min(nblk, s + per)
                got = await arr.read_blocks(s, e - s)
                if check and got != mv[s * BLOCK_SIZE:e * BLOCK_SIZE]:
                    raise AssertionError(f"bench read back wrong bytes near block {s}")

        def timed(fn, *a):
            t = time.perf_counter()
            fn(*a)
            return time.perf_counter() - t

        out = {"raw_w": raw_w, "raw_r": raw_r}
        out["write"] = timed(trio.run, write_all)
        _drop_cache(paths)
        out["read"] = timed(trio.run, read_all, False)
        trio.run(read_all, True)  # untimed: the bytes are right
        arr.fail_disk(1)
        _drop_cache(paths)
        out["degraded"] = timed(trio.run, read_all, False)
        trio.run(read_all, True)
        _drop_cache([p for i, p in enumerate(paths) if i != 1])
        res = arr.rebuild(1)
        out["rebuild"], out["rebuilt_bytes"] = res["seconds"], res["bytes"]
        _drop_cache(paths)
        t = time.perf_counter()
        found = arr.scrub()
        out["scrub"] = time.perf_counter() - t
        out["scrubbed_bytes"] = found["blocks_checked"] * BLOCK_SIZE
        if found["unrecoverable"] or found["parity_mismatches"]:
            raise AssertionError(f"scrub after the bench found damage: {found}")
        return out
    finally:
        arr.close()
        shutil.rmtree(adir, ignore_errors=True)


def run_bench(workdir: str, size: int, ndisks: int, chunk: int, rounds: int,
              console: Console, online: tuple[int, int] | None = None) -> list[dict]:
    """The table's rows; with `online` (speed_min, speed_max), the online rebuild's too."""
    rows_bytes = chunk * (ndisks - 1)
    size = max(rows_bytes, size // rows_bytes * rows_bytes)
    data = np.random.default_rng(0).bytes(size)
    mv = memoryview(data)
    console.print(f"bench raid: {size >> 20} MiB, {ndisks} disks, chunk {chunk >> 10} KiB, "
                  f"{rounds} rounds (median), in {workdir}")
    cluster = None
    runs = []
    try:
        if online is not None:
            from replfs.tools.bench_raid_online import OnlineRebuild
            cluster = OnlineRebuild(workdir, size // (ndisks - 1))
        for _ in range(rounds):
            r = _one_round(workdir, mv, size, ndisks, chunk)
            if cluster is not None:
                r.update(cluster.round(*online))
            runs.append(r)
    finally:
        if cluster is not None:
            cluster.close()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    raw_wbps, raw_rbps = size / med["raw_w"], size / med["raw_r"]
    # what a rebuild moves, done as plain sequential I/O on one file: read n-1 disks'
    # worth, write one disk's worth
    rb = med["rebuilt_bytes"]
    rebuild_equiv = (ndisks - 1) * rb / raw_rbps + rb / raw_wbps

    def row(name, nbytes, secs, base, goal, basis, ratio=None):
        bps = nbytes / secs
        return {"operation": name, "bytes": nbytes, "seconds": secs, "MBps": bps / 1e6,
                "ratio": ratio if ratio is not None else bps / base, "goal": goal,
                "basis": basis}

    extra = []
    if online is not None:
        lim = "/".join(f"{v >> 20}M" if v else "no limit" for v in online)
        extra = [row("online rebuild, workload on mount", med["online_bytes"],
                     med["online_rebuild"], raw_wbps, 0.5, "raw write"),
                 {"operation": f"online rebuild: speed limits min/max {lim}; workload files "
                               f"(256 KiB) written during it: {med['online_files']:.0f}",
                  "note": True}]
    return [
        row("raw write (1 file)", size, med["raw_w"], raw_wbps, None, "baseline"),
        row("raw read (1 file)", size, med["raw_r"], raw_rbps, None, "baseline"),
        row("array sequential write", size, med["write"], raw_wbps, 0.5, "raw write"),
        row("array sequential read", size, med["read"], raw_rbps, 0.6, "raw read"),
        row("array degraded read", size, med["degraded"], raw_rbps, 0.3, "raw read"),
        row("array rebuild (disk bytes)", rb, med["rebuild"], raw_wbps, 0.5, "raw write"),
        row("array rebuild (same I/O)", rb, med["rebuild"], raw_wbps, None,
            f"raw r {ndisks - 1}x + w 1x", ratio=rebuild_equiv / med["rebuild"]),
        row("array scrub (bytes read)", med["scrubbed_bytes"], med["scrub"], raw_rbps, None,
            "raw read"),
    ] + extra


def cmd_bench(args) -> int:
    console = Console(width=max(Console().width, 110))
    size = parse_size(args.size)
    chunk = parse_size(args.chunk)
    base = args.dir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="replfs-bench-", dir=base)
    try:
        online = None if args.no_online else (
            parse_size(args.speed_min) if args.speed_min != "0" else 0,
            parse_size(args.speed_max) if args.speed_max != "0" else 0)
        results = run_bench(workdir, size, args.disks, chunk, args.rounds, console, online)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    np_speed, int_speed = _xor_speeds()
    t = Table(title="replfs bench raid")
    for col in ("operation", "MiB", "seconds", "MB/s", "ratio", "vs", "goal", "met"):
        t.add_column(col, justify="left" if col in ("operation", "vs") else "right",
                     no_wrap=col in ("operation", "vs"))
    failed = 0
    for r in results:
        if r.get("note"):
            continue
        goal = r["goal"]
        met = "" if goal is None else ("[green]yes" if r["ratio"] >= goal else "[red]no")
        failed += goal is not None and r["ratio"] < goal
        t.add_row(r["operation"], f"{r['bytes'] / (1 << 20):.0f}", f"{r['seconds']:.2f}",
                  f"{r['MBps']:.0f}", f"{r['ratio']:.2f}x", r["basis"],
                  "" if goal is None else f">= {goal}x", met)
    console.print(t)
    for r in results:
        if r.get("note"):
            console.print(r["operation"].strip())
    console.print(f"parity XOR of 1 MiB buffers: numpy {np_speed / 1e9:.1f} GB/s, Python int "
                  f"{int_speed / 1e9:.2f} GB/s -> numpy is used")
    return 1 if failed and args.strict else 0


def register(bsub) -> None:
    p = bsub.add_parser("raid", help="RAID-5 array throughput vs one plain image file")
    p.add_argument("--size", default="256M", help="bytes to write and read (default 256M)")
    p.add_argument("--disks", type=int, default=4)
    p.add_argument("--chunk", default="64K")
    p.add_argument("--rounds", type=int, default=3, help="repeat, report medians (3)")
    p.add_argument("--dir", help="where to put the images (default: the temp dir)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a goal is not met")
    p.add_argument("--no-online", action="store_true",
                   help="skip the online rebuild (a mounted cluster under a workload)")
    p.add_argument("--speed-min", default="0", help="the online rebuild's speed limit while "
                   "the array serves I/O (default 0: none; a server's own default is 32M)")
    p.add_argument("--speed-max", default="0", help="... and when it is idle (default 0: "
                   "none)")
    p.set_defaults(func=cmd_bench)
