"""The RAID-5 array: N member disks (image files or block devices) as one BlockDevice.

Contract (see blockdev.py): reads return exactly what was last written or raise
`BlockIOError`; they never return wrong bytes. Every block read from a member is checked
against its crc32c; a mismatch is rebuilt from the other members, checked again, written
back and counted on that disk (`cksum_errors`, like zpool's CKSUM column).

`Array` is put together from one module per concern; this one holds what they share:
the members and their I/O (a failed I/O marks the member failed), the superblocks, the
write-intent bitmap's and the checksums' writes to the members, the BlockDevice API,
flush and clean close, status, and failing a member.

    layout.py       where everything lives on a member; the RAID-5 block mapping
    member.py       one member disk: file, state, counters
    checksums.py    the per-block checksum store of one member (on disk, cached)
    bitmap.py       the write-intent bitmap (the RAID-5 write hole)
    reconstruct.py  verified member contents; repair and degraded reconstruction
    reads.py        the read path (healthy fast read, else reconstruct.py)
    writes.py       the write path (full-stripe, RMW, reconstruct-write; degraded)
    rebuild.py      rebuilding a member, online
    scrub.py        verifying every stripe, online, and repairing
    jobs.py         rebuild and scrub as paced background trio tasks (pause, cancel)
    assemble.py     creating and opening arrays; resync after an unclean stop

Changed checksum blocks are written when the cache evicts them or at `flush()`, before
its fsync; until then their rows are covered by their write-intent bits. On opening an
array whose superblocks say "dirty" (an unclean stop), every row of every set region
(bitmap file OR member copies; a missing or damaged bitmap block counts as all set) is
resynchronised before the array serves anything: checksums are recomputed from the data
found (each block is whole, old or new, which the BlockDevice contract allows for writes
not yet flushed) and parity is recomputed from the data. If a member is missing at that
moment the dirty rows cannot be made consistent: `open_array` refuses with a message
(like md's "cannot start dirty degraded array") unless `force=True`, in which case the
blocks that would have to be reconstructed in those rows raise BlockIOError (and
`rebuild` refuses: those blocks of the missing member are lost).

Concurrency: the core is synchronous (pread/pwrite) under one `threading.RLock`; rebuild
and scrub take it per batch of rows, so they can run in a worker thread while trio tasks
keep reading and writing. `flush()` runs the fsyncs in a worker thread (one per member,
in parallel).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import numpy as np
import trio

from replfs.crash import crash_point

from . import superblock as sbmod
from .bitmap import WriteIntentBitmap
from .blockdev import BlockIOError, check_write
from .checksums import PAGE_MEMORY, SCAN_BATCH, ChecksumStore
from .dirfiles import BITMAP_NAME, read_state
from .errors import RaidError
from .layout import BLOCK_SIZE, Geometry
from .member import Disk, DiskGone
from .reads import ReadMixin
from .rebuild import RebuildMixin
from .reconstruct import ReconstructMixin
from .scrub import ScrubMixin
from .syncthread import FanOut, SyncThread
from .writes import SMALL_WRITE, WriteMixin

__all__ = ["Array", "BLOCK_SIZE", "DEFAULT_CHECKSUM_CACHE", "parse_size"]

# Checksum pages kept in memory per array: 16 MiB hold the checksums of 16 GiB of
# members (a default cluster's arrays whole); beyond that the least recently used are
# read again from the checksum area when needed (checksums.py).
DEFAULT_CHECKSUM_CACHE = 16 << 20


def parse_size(text: str) -> int:
    """'64M' -> 67108864; accepts K, M, G, T suffixes (powers of 1024) and plain bytes."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if s and s[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(s[-1]) + 1)
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise RaidError(f"cannot read size {text!r}: use a number with an optional "
                        f"K, M, G or T suffix, e.g. 64M") from None
    if value <= 0:
        raise RaidError(f"size {text!r} must be positive")
    return int(value * mult)


class Array(ReadMixin, WriteMixin, ReconstructMixin, RebuildMixin, ScrubMixin):
    """A RAID-5 array of member disks; implements BlockDevice. Use `create_array` or
    `open_array` to get one and `close()` it when done (clean shutdown)."""

    def __init__(self, dirpath: str, cfg: dict, geo: Geometry, disks: list[Disk],
                 events: int, lockfd: int, checksum_cache: int = DEFAULT_CHECKSUM_CACHE):
        self.dir = dirpath
        self.checksum_cache = checksum_cache  # bytes of checksum pages kept in memory
        self.cfg = cfg
        self.geo = geo
        self.uuid = cfg["uuid"]
        self.disks = disks
        self.events = events
        self.block_size = BLOCK_SIZE
        self.nblocks = geo.nblocks
        self.notices: list[str] = []
        self._lock = threading.RLock()
        self._lockfd = lockfd
        self._bitmap = WriteIntentBitmap(geo, os.path.join(dirpath, BITMAP_NAME))
        self._pool = ThreadPoolExecutor(max_workers=geo.ndisks, thread_name_prefix="raid")
        self._syncer = SyncThread("raid-sync")      # flush()'s fdatasyncs
        self._fan = FanOut(geo.ndisks - 1, "raid-fsync")  # ... side by side
        self._untrusted_rows: set[int] = set()
        self.zeroed = 0     # blocks lost to the write hole and zeroed (open_array zero_lost)
        self._counters_dirty = False
        self._closed = False
        self.scrub_progress: dict | None = None
        self._scratch = bytearray(0)  # reused for full-stripe writes (no page faults)
        self._rscratch = bytearray(0)  # reused as the target of healthy reads
        self._skip = bytearray(0)  # where healthy reads put parity chunks they pass
        self.stats = {"bitmap_syncs": 0, "flushes": 0, "resynced_rows": 0,
                      "recent_hits": 0}
        # reads and writes through the async API: a background rebuild or scrub slows
        # to its minimum speed while this moves (raid/jobs.py, as md's is_mddev_idle)
        self.io_calls = 0
        # member blocks this array itself wrote lately, (member, entry) -> bytes: the
        # reads a partial-stripe write needs for parity, answered without reading and
        # verifying again (the log rewrites its tail block, and that row's parity, at
        # every commit). Only writes consult it; any other write to a member drops the
        # entries it covers (writes.py).
        self._recent: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    # ----------------------------------------------------------------- member I/O

    def _disk_error(self, disk: Disk, op: str, err: object) -> None:
        """A member failed an I/O: count it, mark it failed, tell the others."""
        self._recent.clear()
        if op == "read":
            disk.read_errors += 1
        else:
            disk.write_errors += 1
        if disk.state in ("active", "rebuilding"):
            disk.state = "failed"
            disk.problem = f"{op} error: {err}"
            self.notices.append(f"disk {disk.index} ({disk.path}) failed: {op} error: {err}")
            disk.close()
            try:
                self._write_superblocks(sync=True)
            except DiskGone:
                pass

    def _pread(self, disk: Disk, pblock: int, nblocks: int) -> bytearray:
        want = nblocks * BLOCK_SIZE
        buf = bytearray(want)
        try:
            got = os.preadv(disk.fd, [buf], pblock * BLOCK_SIZE)
        except OSError as exc:
            self._disk_error(disk, "read", exc)
            raise DiskGone from None
        if got != want:
            self._disk_error(disk, "read", "short read (image truncated?)")
            raise DiskGone
        return buf

    def _pwrite(self, disk: Disk, pblock: int, data) -> None:
        if self._recent and pblock >= self.geo.data_start:     # (not checksums, bitmap)
            self._forget_recent(disk.index, pblock - self.geo.data_start,
                                pblock - self.geo.data_start + len(data) // BLOCK_SIZE)
        disk.unsynced = True
        try:
            n = os.pwrite(disk.fd, data, pblock * BLOCK_SIZE)
            if n != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            self._disk_error(disk, "write", exc)
            raise DiskGone from None

    def _fsync_disks(self, disks: list[Disk] | None = None) -> None:
        """fdatasync members in parallel (an image's size never changes; its mtime need not
        reach the disk). Each fd is dup'ed first (under the lock) so that a
        concurrent close of a member (failure, rebuild) cannot make us fsync a wrong fd."""
        with self._lock:
            jobs = [(d, os.dup(d.fd)) for d in (disks or self.disks) if d.fd is not None]

        def one(job):
            d, fd = job
            try:
                os.fdatasync(fd)
            except OSError as exc:
                return d, exc
            finally:
                os.close(fd)
            return None

        # side by side, the first in this thread (syncthread.FanOut: a pool's hand-off
        # costs about what running them side by side saves)
        results = self._fan.map(one, jobs)
        for bad in results:
            if bad:
                with self._lock:
                    self._disk_error(bad[0], "write", bad[1])

    # ----------------------------------------------------------------- superblocks

    def _member_table(self) -> list[dict]:
        return [{"state": d.state, "rebuild_pos": d.durable_pos, **d.counters()}
                for d in self.disks]

    def _write_superblocks(self, *, state: str = "dirty", sync: bool = True) -> None:
        self.events += 1
        table = self._member_table()
        targets = [d for d in self.disks if d.writable()]
        for d in targets:
            sb = {"uuid": self.uuid, "index": d.index, "ndisks": self.geo.ndisks,
                  "chunk": self.geo.chunk, "block_size": BLOCK_SIZE,
                  "disk_blocks": self.geo.disk_blocks, "events": self.events,
                  "state": state, "members": table, "time": time.time()}
            d.unsynced = True
            try:
                sbmod.write_both(d.fd, sb, self.geo.disk_blocks)
            except OSError as exc:
                self._disk_error(d, "write", exc)
        if sync:
            self._fsync_disks(targets)
        self._counters_dirty = False

    # ----------------------------------------------------------------- checksums

    def _new_store(self, disk: Disk) -> ChecksumStore:
        """An empty store (nothing cached) over `disk`'s checksum area."""
        g = self.geo

        def read(j: int, n: int):
            try:
                return self._pread(disk, g.cs_start + j, n) if disk.fd is not None else None
            except DiskGone:
                return None

        def write(j: int, data: bytes) -> bool:
            if not disk.writable():
                return False
            try:
                self._pwrite(disk, g.cs_start + j, data)
            except DiskGone:
                return False
            return True

        pages = self.checksum_cache // PAGE_MEMORY // g.ndisks
        return ChecksumStore(disk.index, g.entries, g.cs_blocks, read, write, pages)

    def _load_checksums(self, disk: Disk) -> list[int]:
        """Give `disk` a store over its checksum area, after reading the whole area once
        (in batches, keeping nothing) to find damaged checksum blocks: their entries are
        unknown, and the caller repairs them from parity. Returns those blocks."""
        g = self.geo
        store = self._new_store(disk)
        damaged: list[int] = []
        for j in range(0, g.cs_blocks, SCAN_BATCH):
            n = min(SCAN_BATCH, g.cs_blocks - j)
            damaged += store.check_pages(j, self._pread(disk, g.cs_start + j, n))
        disk.cs = store
        return damaged

    def _write_checksums(self) -> None:
        """Write every changed checksum block (no fsync)."""
        for d in self.disks:
            if d.cs is not None and d.writable():
                d.cs.write_dirty()

    # ----------------------------------------------------------------- bitmap

    def _write_bitmap(self, sync: bool) -> None:
        """Write the bits to the bitmap file in DIR (made durable when `sync`: one fsync
        of a small file, which does not force out the members' data) and, lazily, to
        every member's bitmap area (a second copy, durable with the next flush)."""
        image = self._bitmap.image()
        for d in self.disks:
            if d.writable():
                try:
                    self._pwrite(d, self.geo.bitmap_start, image)
                except DiskGone:
                    pass
        self._bitmap.write_file(image, sync)

    def _read_bitmap(self, disk: Disk) -> np.ndarray:
        """The bits of `disk`'s copy."""
        return self._bitmap.parse(self._pread(disk, self.geo.bitmap_start,
                                              self.geo.bitmap_blocks))

    def _ensure_bits(self, rows) -> None:
        """Make the write-intent bits of `rows` durable before their data is written."""
        if self._bitmap.mark(rows):
            self._write_bitmap(sync=True)
            self.stats["bitmap_syncs"] += 1
            crash_point("raid.after_bitmap_set")

    # ----------------------------------------------------------------- state checks

    def _check_open(self) -> None:
        if self._closed:
            raise RaidError("the array is closed")

    def _unusable(self) -> list[Disk]:
        return [d for d in self.disks if d.state != "active"]

    def _check_writable(self) -> None:
        self._check_open()
        bad = [d for d in self.disks if not d.writable()]
        if len(bad) > 1:
            raise BlockIOError(0, "array failed: disks " + ", ".join(
                f"{d.index} ({d.problem or d.state})" for d in bad) + " are unusable")

    # ----------------------------------------------------------------- BlockDevice API

    async def read_block(self, n: int) -> bytes:
        return await self.read_blocks(n, 1)

    async def read_blocks(self, start: int, count: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.io_calls += 1
        return self.read_sync(start, count)

    async def write_blocks(self, blocks: Mapping[int, bytes]) -> None:
        await trio.lowlevel.checkpoint()
        self.io_calls += 1
        check_write(self, blocks)
        dpr = self.geo.data_per_row
        if len(blocks) <= SMALL_WRITE:
            rows = sorted({lb // dpr for lb in blocks})
        else:
            rows = np.unique(np.fromiter(blocks, dtype=np.int64, count=len(blocks))
                             // dpr).tolist()
        if self._bitmap.needs(rows):
            # setting a write-intent bit costs an fsync: do it off the trio thread
            def setbits():
                with self._lock:
                    self._check_writable()
                    self._ensure_bits(rows)
            await trio.to_thread.run_sync(setbits)
        self._write_checked(blocks)

    async def flush(self) -> None:
        with self._lock:
            self._check_open()
            snap = self._before_fsync()
            targets = self._take_unsynced()
        if targets:
            await self._syncer.run(lambda: self._fsync_disks(targets))
        with self._lock:
            self._after_fsync(snap)

    def flush_sync(self) -> None:
        with self._lock:
            self._check_open()
            snap = self._before_fsync()
            targets = self._take_unsynced()
            if targets:
                self._fsync_disks(targets)
            self._after_fsync(snap)

    def _take_unsynced(self) -> list[Disk]:
        """The members written since their last flush began (cleared now: what is
        written from here on waits for the next flush). A flush syncs only those: each
        fdatasync of an image file costs a flush of the device under it, and the
        device serializes them, so a small write's fsync syncs two or three members,
        not all."""
        out = [d for d in self.disks if d.fd is not None and d.unsynced]
        for d in out:
            d.unsynced = False
        return out

    def _before_fsync(self) -> set[int]:
        self.stats["flushes"] += 1
        self._write_checksums()
        if self._counters_dirty:
            self._write_superblocks(sync=False)
        return self._bitmap.start_interval()

    def _after_fsync(self, snap: set[int]) -> None:
        keep = {r // self.geo.region_rows for r in self._untrusted_rows}
        if self._bitmap.clear_idle(snap, keep):
            self._write_bitmap(sync=False)

    def close(self) -> None:
        """Clean shutdown: flush, clear the bitmap, mark the superblocks clean."""
        with self._lock:
            if self._closed:
                return
            try:
                self._write_checksums()
                self._fsync_disks()
                if not self._untrusted_rows and any(d.writable() for d in self.disks):
                    self._bitmap.bits[:] = False
                    self._write_bitmap(sync=False)
                self._write_superblocks(state="clean" if not self._untrusted_rows
                                        else "dirty", sync=True)
            finally:
                self._closed = True
                for d in self.disks:
                    d.close()
                self._pool.shutdown(wait=False)
                if self._lockfd >= 0:
                    os.close(self._lockfd)
                    self._lockfd = -1
                self._bitmap.close()
        # outside the lock: a flush still in the sync thread takes it (and then finds
        # the members closed)
        self._syncer.close()
        self._fan.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- status

    def health(self) -> str:
        bad = self._unusable()
        if not bad:
            return "healthy"
        if len(bad) > 1:
            return "failed"
        return "rebuilding" if bad[0].state == "rebuilding" else "degraded"

    def status(self) -> dict:
        """A JSON-able picture of the array: health, geometry, each disk's state and
        counters, rebuild and scrub progress, notices."""
        with self._lock:
            g = self.geo
            disks = []
            for d in self.disks:
                info = {"index": d.index, "path": d.path, "state": d.state,
                        "problem": d.problem, **d.counters()}
                if d.state == "rebuilding":
                    info["rebuild_progress"] = round(d.rebuild_pos / g.rows, 4)
                disks.append(info)
            state = read_state(self.dir)
            return {"dir": self.dir, "uuid": self.uuid, "health": self.health(),
                    "ndisks": g.ndisks, "chunk": g.chunk, "block_size": BLOCK_SIZE,
                    "nblocks": g.nblocks, "size_bytes": g.nblocks * BLOCK_SIZE,
                    "events": self.events, "dirty_regions": int(self._bitmap.bits.sum()),
                    "disks": disks, "scrub": self.scrub_progress or state.get("scrub"),
                    "stats": dict(self.stats), "checksum_cache": self._cache_status(),
                    "notices": list(self.notices[-20:])}

    def _cache_status(self) -> dict:
        stores = [d.cs for d in self.disks if d.cs is not None]
        out = {"limit_bytes": self.checksum_cache,
               "pages": sum(s.cached_pages() for s in stores)}
        for key in ("hits", "misses", "writebacks"):
            out[key] = sum(s.stats[key] for s in stores)
        return out

    # ----------------------------------------------------------------- maintenance

    def fail_disk(self, k: int) -> None:
        """Mark member k failed (as if it had died): the array goes on degraded."""
        with self._lock:
            self._check_open()
            disk = self.member(k)
            if disk.state in ("failed", "missing"):
                return
            others = [d for d in self.disks if d is not disk and d.state != "active"]
            if others:
                raise RaidError(f"refusing to fail disk {k}: disk {others[0].index} is already "
                                f"{others[0].state}, and RAID-5 cannot lose two disks")
            self._write_checksums()
            self._fsync_disks()
            disk.state = "failed"
            disk.problem = "marked failed by the operator"
            disk.close()
            self._write_superblocks(sync=True)
            self.notices.append(f"disk {k} marked failed")

    def member(self, k: int) -> Disk:
        """Member k; RaidError naming the valid range otherwise."""
        if not 0 <= k < len(self.disks):
            raise RaidError(f"no disk {k}: the array has disks 0..{len(self.disks) - 1}")
        return self.disks[k]
