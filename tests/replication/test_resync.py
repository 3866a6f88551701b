"""Incremental resync (issue 13, point 2): a backup that was in sync before a short
absence receives only the blocks changed since (the primary's persistent dirty map,
replication/dirtymap.py), also after the primary itself restarted; a primary killed in
the middle of that transfer loses no acknowledged operation; the replicas compare
identical after."""

import os
import re
import signal
import threading

import pytest

from clusterhelp import compare_replicas, followers, wait_for
from mounthelp import replfs

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.placement("parent")]

FILES = 20


class Workload(threading.Thread):
    """Overwrites, in place, a 16 KiB range of one of FILES files, and appends a line to
    a journal file, one after the other; `acked[f]` is the last value whose write to
    file f returned (its content must be there after any failure)."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d = d
        self.acked: dict[int, int] = {}
        self.count = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.d / "journal", "ab") as journal:
                i = 0
                while not self.stop.is_set():
                    f = i % FILES
                    with open(self.d / f"f{f}", "r+b") as fh:
                        fh.write(payload(i))
                    journal.write(f"{i}\n".encode())
                    journal.flush()
                    self.acked[f] = i
                    self.count = i = i + 1
        except BaseException as exc:       # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(120)
        assert not self.is_alive(), "the workload hangs"
        assert self.error is None, f"the workload failed: {self.error!r}"

    def check(self) -> None:
        """Every acknowledged write is there."""
        for f, i in self.acked.items():
            assert (self.d / f"f{f}").read_bytes()[:16384] == payload(i), f"f{f}: write {i} lost"
        lines = (self.d / "journal").read_text().split()
        assert lines == [str(i) for i in range(self.count)]

    def wait_ops(self, n: int, timeout: float = 60) -> None:
        start = self.count
        wait_for(lambda: self.error or self.count >= start + n, timeout,
                 f"{n} more acknowledged writes")
        assert self.error is None, f"the workload failed: {self.error!r}"


def payload(i: int) -> bytes:
    return f"{i:08d}".encode() * 2048


def populate(running) -> Workload:
    """32 MiB of data (so the allocated blocks dwarf what a short absence changes), the
    workload's files, and the workload started; returns once the backup has forced the
    bulk of it (the primary's dirty map holds what the backup has not forced yet)."""
    d = running.mnt / "w"
    d.mkdir()
    with open(d / "bulk", "wb") as f:          # in large writes: quick through FUSE
        for _ in range(32):
            f.write(os.urandom(2**20))
    for f in range(FILES):
        (d / f"f{f}").write_bytes(bytes(65536))
    w = Workload(d)
    w.start()
    w.wait_ops(20)
    primary = running.primary()
    wait_for(lambda: running.cluster.status()["servers"][primary]["dirty_blocks"] < 200, 30,
             "the backup forcing what it received")
    return w


def transfers(running, server) -> list[tuple[str, int, int]]:
    """(kind, blocks planned, blocks allocated) of each transfer in `server`'s log."""
    found = re.findall(r"(\w+) state transfer to \w+: (\d+) blocks \(of (\d+) allocated\)",
                       running.log(server))
    return [(k, int(p), int(a)) for k, p, a in found]


def backup_away(running, w: Workload, ops: int) -> None:
    """kill -9 the backup; the primary goes on alone for `ops` acknowledged writes."""
    running.cluster.signal(running.view()["backup"], signal.SIGKILL)
    running.cluster.wait_until(lambda st: not st["viewserver"]["groups"]["0"]["backup"],
                               timeout=30, what="the view without the backup")
    w.wait_ops(ops)


def replicas_identical(running) -> None:
    running.unmount()
    running.cluster.stop_all()
    diff, compared = compare_replicas(running.cfg)
    assert compared > 6000 and diff == {s: [] for s in followers(running.cfg)}


def incremental_and_identical(running, w: Workload, st: dict, sender: str, counter: str):
    """The last transfer `sender` made (in status `st`) was incremental, counted in its
    stat `counter`, and under 5% of the allocated blocks; every acknowledged write is
    there; the replicas compare identical."""
    stats = st["servers"][sender]["stats"]
    last = stats["last_transfer"]
    assert last["kind"] == "incremental" and stats[counter] >= 1, last
    assert 0 < last["planned"] < 0.05 * last["allocated"], last
    w.check()
    replicas_identical(running)


def test_backup_back_after_a_short_absence_gets_an_incremental_transfer(running):
    primary, backup = running.primary(), running.view()["backup"]
    w = populate(running)
    try:
        backup_away(running, w, 60)
        running.cluster.start_server(backup)
        st = running.cluster.wait_protected(timeout=60)
        w.wait_ops(20)
    finally:
        w.finish()
    incremental_and_identical(running, w, st, primary, "transfers_dirty")


def test_primary_restarted_meanwhile_still_incremental_and_killed_during_it(running):
    primary, backup = running.primary(), running.view()["backup"]
    w = populate(running)
    try:
        backup_away(running, w, 30)
        # blocks changed only before the restart: the map on disk must still name them
        unique = os.urandom(65536)
        (running.mnt / "w/while-away").write_bytes(unique)
        # the primary restarts while its backup is away: its dirty map is on its disk
        running.cluster.signal(primary, signal.SIGKILL)
        running.cluster.start_server(primary)
        running.cluster.wait_primary(timeout=60)
        assert running.primary() == primary
        w.wait_ops(30)
        # and dies (as kill -9) once it sent the returning backup a first chunk
        replfs("fault", "crash-at", running.cfg.dir, "--server", primary, "sync.chunk.sent")
        running.cluster.start_server(backup)
        wait_for(lambda: not running.cluster.alive(primary), 60, "the primary's crash")
        kind, planned, allocated = transfers(running, primary)[-1]
        assert kind == "incremental" and planned < 0.05 * allocated
        # back again: the backup kept its position through the interrupted transfer, so
        # this one is incremental too (and the replicas compare identical after it)
        running.cluster.start_server(primary)
        running.cluster.wait_protected(timeout=90)
        assert transfers(running, primary)[-1][0] == "incremental"
        w.wait_ops(20)
    finally:
        w.finish()
    w.check()
    assert (running.mnt / "w/while-away").read_bytes() == unique
    replicas_identical(running)


def test_old_primary_back_after_a_failover_gets_the_union_of_both_maps(running):
    """The primary is killed under the workload, its backup takes over and goes on alone;
    the old primary comes back as its backup and receives only the blocks either of them
    changed since the new primary's last forced position of the old one's stream (the
    union of their dirty maps), not every allocated block; nothing acknowledged is lost,
    and the replicas compare identical after."""
    old, new = running.primary(), running.view()["backup"]
    w = populate(running)
    try:
        running.cluster.signal(old, signal.SIGKILL)
        running.cluster.wait_until(
            lambda st: st["viewserver"]["groups"]["0"]["primary"] == new, timeout=30,
            what="the failover")
        w.wait_ops(60)
        running.cluster.start_server(old)
        st = running.cluster.wait_protected(timeout=60)
        assert running.view()["backup"] == old
        w.wait_ops(20)
    finally:
        w.finish()
    incremental_and_identical(running, w, st, new, "transfers_merged")
