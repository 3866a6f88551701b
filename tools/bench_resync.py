"""The resync of a backup after a short absence, incremental against full, in one run
(part of `replfs bench failover`).

One mounted cluster; a writer appends 4 KiB blocks to a file and rewrites a 64 KiB
range of another while 32 MiB of data sit beside them. Each round kills the backup of
group 0 (kill -9), lets the writer go on for `absence` seconds, and starts the backup
again; the primary's figures of the transfer that follows (its kind, the blocks sent,
the seconds from the backup's position to `SyncDone`) are read from `replfs status`.
Rounds alternate: an incremental one (the primary's dirty map covers the backup's
position), then a full one (the stopped backup's position is first forgotten, as a
wiped replica's would be, so it gets every allocated block), then a failover one: the
*primary* is killed, its backup takes over and goes on alone for `absence` seconds, and
the old primary comes back as its backup, receiving the union of the two dirty maps
(replication/dirtymap.py). The medians are reported.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import trio


class Writer(threading.Thread):
    def __init__(self, d: str):
        super().__init__(daemon=True)
        self.d = d
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(os.path.join(self.d, "log"), "ab") as log, \
                    open(os.path.join(self.d, "hot"), "r+b") as hot:
                i = 0
                while not self.stop.is_set():
                    log.write(b"x" * 4096)
                    log.flush()
                    hot.seek(0)
                    hot.write(i.to_bytes(8, "little") * 8192)
                    hot.flush()
                    i += 1
        except BaseException as exc:       # reported by the benchmark
            self.error = exc


async def _forget_position(server_dir: str) -> None:
    """What a wiped replica reports: no position (the server is stopped)."""
    from replfs.fs.mkfs import open_fs
    from replfs.raid import open_array
    from replfs.replication import amo
    array = open_array(server_dir)
    try:
        fs = await open_fs(array, reclaim=False)
        blk = amo.position_block(array.nblocks)

        async def fn(txn):
            await txn.write(blk, 0, amo.pack_position("", 0))
        try:
            await fs.mgr.run(fn, name="bench-forget-position")
        finally:
            await fs.close()
    finally:
        array.close()


KINDS = {"incremental": "incremental", "full": "full", "failover": "incremental"}


def _round(cluster, mnt: str, kind: str, absence: float) -> dict:
    st = cluster.status()
    view = st["viewserver"]["groups"]["0"]
    # who goes away, and who sends the transfer when it is back
    away, primary = ((view["primary"], view["backup"]) if kind == "failover"
                     else (view["backup"], view["primary"]))
    done = st["servers"][primary]["stats"]["transfers_full"] + \
        st["servers"][primary]["stats"]["transfers_dirty"]
    cluster.signal(away, signal.SIGKILL)
    cluster.wait_until(lambda s: (s["viewserver"]["groups"]["0"]["primary"] == primary
                                  and not s["viewserver"]["groups"]["0"]["backup"]), 30,
                       f"the view without {away}")
    t0 = time.monotonic()
    if kind == "full":
        trio.run(_forget_position, cluster.cfg.server_dir(away))
    time.sleep(max(0.0, absence - (time.monotonic() - t0)))
    cluster.start_server(away)

    def transferred(s):
        stats = s["servers"].get(primary, {}).get("stats", {})
        return (stats.get("transfers_full", 0) + stats.get("transfers_dirty", 0) > done
                and s["servers"][primary].get("backup_synced"))
    st = cluster.wait_until(transferred, 120, "the backup's transfer")
    last = st["servers"][primary]["stats"]["last_transfer"]
    # the next round starts once the primary's dirty map has forgotten this transfer
    # (its base moved: the backup forced what it got)
    base = st["servers"][primary]["dirty_base"]
    cluster.wait_until(lambda s: s["servers"][primary]["dirty_base"] != base, 30,
                       "the dirty map's new base")
    return dict(kind=last["kind"], blocks=last["planned"], allocated=last["allocated"],
                seconds=last["seconds"])


def measure(base: str, rounds: int = 3, absence: float = 2.0) -> dict:
    """{"incremental": {...}, "full": {...}, "failover": {...}, "ratio": {...},
    "ratio_failover": {...}}: the medians over `rounds` rounds of each kind, and of each
    round's incremental/full and failover/full ratios."""
    from replfs.tools.cluster import start_mounted_cluster
    mnt, cluster, stop = start_mounted_cluster(base, disk_size=32 * 2**20, placement="parent")
    try:
        with open(os.path.join(mnt, "bulk"), "wb") as f:
            for _ in range(32):
                f.write(os.urandom(2**20))
        with open(os.path.join(mnt, "hot"), "wb") as f:
            f.write(bytes(65536))
        w = Writer(mnt)
        w.start()
        runs: dict[str, list[dict]] = {k: [] for k in KINDS}
        try:
            for _ in range(rounds):
                for kind in KINDS:
                    r = _round(cluster, mnt, kind, absence)
                    if r["kind"] != KINDS[kind]:
                        raise RuntimeError(f"a {kind} round made a {r['kind']} transfer")
                    runs[kind].append(r)
        finally:
            w.stop.set()
            w.join(60)
        if w.error is not None:
            raise RuntimeError(f"the writer failed: {w.error}")
        out = {k: dict(blocks=statistics.median(r["blocks"] for r in rs),
                       allocated=statistics.median(r["allocated"] for r in rs),
                       seconds=statistics.median(r["seconds"] for r in rs))
               for k, rs in runs.items()}
        for key, kind in (("ratio", "incremental"), ("ratio_failover", "failover")):
            pairs = list(zip(runs[kind], runs["full"]))
            out[key] = {x: statistics.median(i[x] / max(f[x], 1e-9) for i, f in pairs)
                        for x in ("blocks", "seconds")}
        return out
    finally:
        stop()
