"""Rebuilding a member from the others, online.

`rebuild(k)` recomputes member k (failed, missing, stale, or replaced by a new image)
row batch by row batch, each batch under the array's lock, so trio tasks and other
threads keep reading and writing meanwhile: rows below the rebuild position are served
from the new member, rows above it are reconstructed (reconstruct.py). Progress is
recorded in the superblocks every `REBUILD_PERSIST_SECS` (after an fsync of what was
rebuilt), so a stopped rebuild leaves the member "rebuilding" and status shows how far
it got; `rebuild(k)` of such a member resumes there (the same process after a stop, or a
new one after a restart). `rebuild_steps` is the same work one batch per step, for a
caller that paces it (raid/jobs.py: the background rebuild of a running server). Blocks that cannot be computed (damaged on another member too) get a checksum
they fail and are counted `unrecoverable`: they are never served as good.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Callable, Generator

import numpy as np

from replfs.crash import crash_point

from .checksums import block_crcs
from .dirfiles import CONFIG_NAME, write_json
from .errors import RaidError
from .layout import BLOCK_SIZE
from .member import DiskGone, disk_size

REBUILD_PERSIST_SECS = 2.0  # how often a rebuild records its progress in the superblocks
REBUILD_BATCH = 8 << 20  # bytes per member per rebuild/scrub step (one lock hold)


def run_steps(steps: Generator[tuple[int, int], None, dict],
              progress: Callable[[int, int], None] | None) -> dict:
    """Run a step generator (`rebuild_steps`, `scrub_steps`) to its end, telling
    `progress(rows done, rows)` after each step; its result."""
    while True:
        try:
            row, rows = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress:
            progress(row, rows)


class RebuildMixin:
    """Part of `Array` (array.py): `rebuild`. Uses the array's `geo`, `disks`, `dir`,
    `cfg`, `notices`, `_lock`, member I/O, checksum, bitmap and superblock writes and
    the reconstruction methods (reconstruct.py)."""

    def rebuild(self, k: int, image: str | None = None,
                progress: Callable[[int, int], None] | None = None,
                batch_rows: int | None = None) -> dict:
        """Rebuild member k (failed, missing, stale or replaced) from the others, online:
        other threads may read and write meanwhile. With `image`, the member is moved to
        that path (created if missing) and the config updated; a member already
        "rebuilding" (an interrupted rebuild) without a new image resumes at the position
        its superblocks recorded. Returns a summary."""
        return run_steps(self.rebuild_steps(k, image, batch_rows), progress)

    def rebuild_steps(self, k: int, image: str | None = None,
                      batch_rows: int | None = None) -> Generator[tuple[int, int], None, dict]:
        """`rebuild` one batch of rows per step. The checks (RaidError) and the switch to
        the new member happen now; the generator returned yields (rows done, rows) after
        each batch (between two steps the array's lock is free) and returns the summary.
        Closing it early stops the rebuild where it stands: what was rebuilt is fsynced
        and its position recorded, so a later `rebuild(k)` resumes there."""
        g = self.geo
        with self._lock:
            self._check_open()
            disk = self.member(k)
            others = [d for d in self.disks if d is not disk and d.state != "active"]
            if others:
                o = others[0]
                raise RaidError(f"cannot rebuild disk {k}: disk {o.index} ({o.path}) is "
                                f"{o.state} too, so disk {k} cannot be computed from the others")
            if self._untrusted_rows:
                raise RaidError(f"cannot rebuild disk {k}: {len(self._untrusted_rows)} rows "
                                f"were mid-write at an unclean stop while degraded, so their "
                                f"blocks on disk {k} are lost")
            path = image or disk.path
            resume = (disk.state == "rebuilding" and disk.fd is not None and disk.cs is not None
                      and (image is None or os.path.abspath(image) == os.path.abspath(disk.path)))
            if resume:
                disk.rebuild_pos = disk.durable_pos
                disk.problem = ""
            else:
                self._start_member(disk, path, image is not None)
        return self._rebuild_loop(disk, path, batch_rows or max(1, REBUILD_BATCH // g.chunk))

    def _rebuild_loop(self, disk, path: str, batch: int
                      ) -> Generator[tuple[int, int], None, dict]:
        g = self.geo
        k = disk.index
        lost_total = 0
        t0 = time.monotonic()
        first = disk.rebuild_pos
        last_sb = t0
        row = first
        try:
            while row < g.rows:
                r1 = min(g.rows, row + batch)
                with self._lock:
                    lost_total += self._rebuild_rows(disk, row, r1, batch)
                    if time.monotonic() - last_sb > REBUILD_PERSIST_SECS:
                        self._persist_rebuild(disk)
                        last_sb = time.monotonic()
                row = r1
                crash_point("raid.rebuild_step")
                yield row, g.rows
        finally:
            if row < g.rows:            # stopped early: keep what was done
                with self._lock:
                    if not self._closed and disk.state == "rebuilding":
                        self._persist_rebuild(disk)
        with self._lock:
            self._write_checksums()
            self._fsync_disks()
            disk.state = "active"
            disk.rebuild_pos = disk.durable_pos = 0
            self._write_superblocks(sync=True)
            self.notices.append(f"disk {k} rebuilt onto {path}")
        secs = time.monotonic() - t0
        return {"disk": k, "path": path, "rows": g.rows, "seconds": secs,
                "resumed_at": first, "bytes": (g.rows - first) * g.cb * BLOCK_SIZE,
                "lost_blocks": lost_total}

    def _start_member(self, disk, path: str, moved: bool) -> None:
        """Make `disk` a new, empty member at `path`, rebuilding from row 0 (under the
        lock)."""
        fd = self._open_target(path)
        self._write_checksums()
        self._fsync_disks()
        disk.close()
        disk.fd = fd
        disk.path = path
        disk.state = "rebuilding"
        disk.problem = ""
        disk.rebuild_pos = disk.durable_pos = 0
        disk.cs = self._new_store(disk)  # what it held is being replaced
        if moved:
            self.cfg["disks"][disk.index] = self._config_path(path)
            write_json(os.path.join(self.dir, CONFIG_NAME), self.cfg)
        self._write_bitmap(sync=False)
        self._write_superblocks(sync=True)

    def _rebuild_rows(self, disk, row: int, r1: int, batch: int) -> int:
        """Compute rows [row, r1) of `disk` from the others and write them (under the
        lock). Returns how many blocks could not be computed."""
        g = self.geo
        k = disk.index
        self._check_open()
        if disk.state != "rebuilding":
            raise RaidError(f"rebuild of disk {k} stopped: {disk.problem or disk.state}")
        e0, e1 = row * g.cb, r1 * g.cb
        cache: dict = {}
        self._prefetch(cache, [(d, e0, e1) for d in range(g.ndisks) if d != k])
        self._readahead([d for d in range(g.ndisks) if d != k], e1,
                        min(g.rows, r1 + batch) * g.cb)
        acc = np.zeros((e1 - e0) * BLOCK_SIZE, dtype=np.uint8)
        lost: set[int] = set()
        for d in range(g.ndisks):
            if d == k:
                continue
            buf, dl = self._get(cache, d, e0, e1)
            if len(dl) == e1 - e0:
                raise RaidError(f"rebuild of disk {k} stopped: disk {d} failed too")
            acc ^= buf
            lost.update(dl)
        try:
            self._pwrite(disk, g.data_start + e0, acc.data)
        except DiskGone:
            raise RaidError(f"rebuild of disk {k} stopped: cannot write {disk.path}: "
                            f"{disk.problem}") from None
        crcs = block_crcs(acc.data, e1 - e0)
        for i in lost:  # make them fail their checksum: never serve wrong bytes
            crcs[i] ^= 0xFFFFFFFF
            disk.unrecoverable += 1
        disk.cs.put(e0, crcs)
        disk.rebuild_pos = r1
        return len(lost)

    def _persist_rebuild(self, disk) -> None:
        """Record how far the rebuild of `disk` got: its rows and checksums fsynced first,
        then the position in the superblocks (under the lock)."""
        self._write_checksums()
        self._fsync_disks([disk])
        disk.durable_pos = disk.rebuild_pos
        self._write_superblocks(sync=False)

    def _config_path(self, path: str) -> str:
        ap = os.path.abspath(path)
        d = os.path.abspath(self.dir)
        return os.path.relpath(ap, d) if os.path.dirname(ap) == d else ap

    def _open_target(self, path: str) -> int:
        g = self.geo
        need = g.disk_blocks * BLOCK_SIZE
        for other in self.disks:
            if other.fd is not None and os.path.exists(path) and other.state == "active" \
                    and os.path.samefile(other.path, path):
                raise RaidError(f"{path} is disk {other.index} of this array; give a new image")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RaidError(f"cannot open {path}: {exc.strerror}") from None
        size = disk_size(fd)
        if size < need:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, need)
            else:
                os.close(fd)
                raise RaidError(f"{path} has {size} bytes; a member of this array needs "
                                f"{need}")
        return fd
