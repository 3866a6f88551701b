"""`replfs bench txn`: group commit and recovery speed of the transaction layer.

Over one FileDevice image on disk (real fsync), in one run: commits per second of a
single writer that flushes the log for every commit (the baseline), then of 1, 8 and 64
concurrent writers with group commit (and 64 writers without it, for contrast), each as
a ratio to the baseline; then the recovery time per MiB of log.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import trio

from replfs.raid.blockdev import FileDevice
from replfs.txn import TxnManager

LOG_START = 1
LOG_BLOCKS = 256          # 1 MiB log for the commit rows
DATA_BASE = LOG_START + 4096 + 8
NBLOCKS = DATA_BASE + 256


def register(sub) -> None:
    p = sub.add_parser("txn", help="commits/s with and without group commit; recovery time")
    p.add_argument("--dir", default=None,
                   help="directory for the image file (default: a temporary directory "
                        "under the current one, so that fsync hits the real disk)")
    p.add_argument("--seconds", type=float, default=0.5,
                   help="duration of each row in each round")
    p.add_argument("--rounds", type=int, default=6,
                   help="rounds over all rows, interleaved so that a noisy moment of the "
                        "shared disk hits every row alike; figures are summed over rounds")
    p.add_argument("--recovery-mib", type=float, default=4.0,
                   help="MiB of log to recover in the recovery measurement")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    tmp = tempfile.mkdtemp(prefix="replfs-bench-txn-", dir=args.dir or os.getcwd())
    try:
        image = os.path.join(tmp, "txn.img")
        rows, rec = trio.run(_bench, image, args.seconds, args.rounds, args.recovery_mib)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"commits": rows, "recovery": rec}, indent=2))
    else:
        _print(rows, rec)
    return 0


async def _commit_rate(image: str, writers: int, group_commit: bool, seconds: float) -> dict:
    dev = FileDevice(image, NBLOCKS, create=True)
    try:
        await TxnManager.format(dev, log_start=LOG_START, log_blocks=LOG_BLOCKS)
        mgr = await TxnManager.open(dev, log_start=LOG_START, log_blocks=LOG_BLOCKS,
                                    group_commit=group_commit)
        flushes0 = mgr.log.flushes
        count = 0
        deadline = trio.current_time() + seconds

        async def writer(w: int) -> None:
            nonlocal count
            seq = 0
            while trio.current_time() < deadline:
                seq += 1

                async def fn(txn, seq=seq):
                    await txn.lock(("writer", w), "X")
                    await txn.write(DATA_BASE + w, (seq * 64) % 4032,
                                    seq.to_bytes(8, "little") * 8)
                await mgr.run(fn, name="bench")
                count += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for w in range(writers):
                n.start_soon(writer, w)
        elapsed = time.perf_counter() - t0
        flushes = mgr.log.flushes - flushes0
        await mgr.close()
    finally:
        dev.close()
    return dict(mode="group commit" if group_commit else "flush per commit",
                writers=writers, commits=count, seconds=elapsed,
                rate=count / elapsed, flushes=flushes,
                per_flush=count / max(1, flushes))


async def _recovery(image: str, mib: float) -> dict:
    log_blocks = int(mib * 256 * 1.5) + 16
    dev = FileDevice(image, LOG_START + log_blocks + 300, create=True)
    data_base = LOG_START + log_blocks + 8
    try:
        await TxnManager.format(dev, log_start=LOG_START, log_blocks=log_blocks)
        mgr = await TxnManager.open(dev, log_start=LOG_START, log_blocks=log_blocks,
                                    checkpoint_at=1.0)
        target = int(mib * 1024 * 1024)

        async def writer(w: int) -> None:
            seq = 0
            while mgr.log.used < target:
                seq += 1

                async def fn(txn, seq=seq):
                    await txn.write(data_base + w, (seq * 512) % 3584, bytes([seq % 256]) * 512)
                await mgr.run(fn, name="fill")

        async with trio.open_nursery() as n:
            for w in range(64):
                n.start_soon(writer, w)
        # "crash": abandon the manager; the log is durable, no page was checkpointed
    finally:
        dev.close()
    dev = FileDevice(image)
    try:
        t0 = time.perf_counter()
        mgr = await TxnManager.open(dev, log_start=LOG_START, log_blocks=log_blocks)
        seconds = time.perf_counter() - t0
        r = mgr.recovery
        await mgr.close()
    finally:
        dev.close()
    log_mib = r["log_bytes"] / 2 ** 20
    return dict(log_mib=log_mib, records=r["records"], redone=r["redone"], seconds=seconds,
                seconds_per_mib=seconds / log_mib, mib_per_second=log_mib / seconds)


CONFIGS = [(1, False), (1, True), (8, True), (64, True), (64, False)]


async def _bench(image: str, seconds: float, rounds: int, mib: float):
    per_round: list[list[dict]] = [[] for _ in CONFIGS]
    for _ in range(rounds):
        for i, (writers, group) in enumerate(CONFIGS):
            per_round[i].append(await _commit_rate(image, writers, group, seconds))
    rows = []
    for runs in per_round:
        r = dict(runs[0])
        for k in ("commits", "seconds", "flushes"):
            r[k] = sum(x[k] for x in runs)
        r["rate"] = r["commits"] / r["seconds"]
        r["per_flush"] = r["commits"] / max(1, r["flushes"])
        r["ms_per_flush"] = 1000 * r["seconds"] / max(1, r["flushes"])
        rows.append(r)
    base = rows[0]["rate"]
    for i, r in enumerate(rows):
        r["ratio"] = r["rate"] / base
        # the same ratio per round (baseline of that round), median over the rounds:
        # robust against a noisy moment of the shared machine
        r["median_ratio"] = statistics.median(
            x["rate"] / b["rate"] for x, b in zip(per_round[i], per_round[0]))
    return rows, await _recovery(image, mib)


def _print(rows, rec) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="replfs bench txn: commits on a FileDevice image (real fsync)")
    for col in ("mode", "writers", "commits", "seconds", "commits/s", "fsyncs",
                "ms/fsync", "commits/fsync", "vs baseline", "median of rounds"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for i, r in enumerate(rows):
        t.add_row(r["mode"] + (" (baseline)" if i == 0 else ""), str(r["writers"]),
                  str(r["commits"]), f"{r['seconds']:.2f}", f"{r['rate']:.0f}",
                  str(r["flushes"]), f"{r['ms_per_flush']:.2f}", f"{r['per_flush']:.1f}",
                  f"{r['ratio']:.1f}x", f"{r['median_ratio']:.1f}x")
    c = Console(width=max(110, Console().width))
    c.print(t)
    t2 = Table(title="recovery (scan + redo + checkpoint)")
    for col in ("log MiB", "records", "redone", "seconds", "s per MiB", "MiB/s"):
        t2.add_column(col, justify="right")
    t2.add_row(f"{rec['log_mib']:.2f}", str(rec["records"]), str(rec["redone"]),
               f"{rec['seconds']:.3f}", f"{rec['seconds_per_mib']:.3f}",
               f"{rec['mib_per_second']:.1f}")
    c.print(t2)
    goal = rows[3]["median_ratio"]
    c.print(f"64 writers with group commit: {goal:.1f}x the one-flush-per-commit baseline "
            f"(median over rounds; goal >= 10x: "
            f"{'met' if goal >= 10 else 'NOT met'})")
