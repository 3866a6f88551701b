"""The RAID-5 array: N member disks (image files or block devices) as one BlockDevice.

Contract (see blockdev.py): reads return exactly what was last written or raise
`BlockIOError`; they never return wrong bytes. Every block read from a member is checked
against its crc32c; a mismatch is rebuilt from the other members, checked again, written
back and counted on that disk (`cksum_errors`, like zpool's CKSUM column).

Parity: numpy XOR on whole buffers (uint8 arrays). Measured on this machine: numpy XOR
of two 1 MiB buffers runs at ~19 GB/s, Python int XOR (with the bytes<->int conversions it
needs) at ~0.3 GB/s, so numpy it is.

Writes: a batch is split into chunk rows. Runs of whole rows are full-stripe writes (parity
computed from the new data alone, one large pwrite per disk). A partial row is a
read-modify-write over the touched offset range: either "RMW" (read old data of the touched
chunks and old parity) or "reconstruct-write" (read the untouched chunks), whichever reads
fewer chunks; a block that cannot be read is reconstructed from the others, so both also
work degraded.

The write hole: a write-intent bitmap, as md's. One bit per region of rows (about 16 MiB of
logical space, `layout.BITMAP_REGION_BYTES`). Its durable copy is the small file
DIR/bitmap (like md's external bitmap file), so that making a bit durable costs the fsync
of one 4 KiB file, not of every member (an fsync of a member would also force out all its
dirty data); every member also carries a copy in its bitmap area, written lazily. Before
the first write to a region its bit is set and the bitmap file fsynced; later writes to
that region cost nothing extra, and a sequential writer sets the next few regions at once
(`BITMAP_LOOKAHEAD`). Bits are cleared lazily: after a `flush()`, a region that was not
written during that flush interval nor the one before is cleared (no fsync: a bit lost in
a crash only costs a needless resync). Checksum blocks are written at `flush()`, before
its fsync; until then their rows are covered by their bits.
On opening an array whose superblocks say "dirty" (an unclean stop), every row of every
set region (bitmap file OR member copies; a missing or damaged bitmap block counts as all
set) is resynchronised before the array serves anything: checksums are recomputed from
the data found (each block is whole, old or new, which the BlockDevice contract allows
for writes not yet flushed) and parity is recomputed from the data. If a member is
missing at that moment the dirty rows cannot be made consistent: `open_array` refuses with
a message (like md's "cannot start dirty degraded array") unless `force=True`, in which
case the blocks that would have to be reconstructed in those rows raise BlockIOError
(and `rebuild` refuses: those blocks of the missing member are lost).

Concurrency: the core is synchronous (pread/pwrite) under one `threading.RLock`; rebuild
and scrub take it per batch of rows, so they can run in a worker thread while trio tasks
keep reading and writing. `flush()` runs the fsyncs in a worker thread (one per member,
in parallel).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import crc32c
import numpy as np
import trio

from replfs.crash import crash_point

from . import superblock as sbmod
from .blockdev import BlockIOError, check_range, check_write
from .dirfiles import (BITMAP_NAME, CONFIG_NAME, read_state, update_state,
                       write_json)
from .errors import RaidError
from .layout import BITS_PER_BITMAP_BLOCK, BLOCK_SIZE, CRC_ENTRIES_PER_BLOCK, Geometry

BITMAP_LOOKAHEAD = 3  # regions set ahead of a sequential writer
REBUILD_PERSIST_SECS = 2.0  # how often a rebuild records its progress in the superblocks
REBUILD_BATCH = 8 << 20  # bytes per member per rebuild/scrub step (one lock hold)
SMALL_WRITE = 64  # a write of at most this many blocks maps its rows without numpy

_crc = crc32c.crc32c


class _DiskGone(Exception):
    """Internal: a member failed an I/O; the caller falls back to the other members."""


def _mix(disk: int, entries: np.ndarray) -> np.ndarray:
    """Per-position salt XORed into each crc stored on disk, so that a checksum block
    copied to the wrong place (or disk) does not verify its blocks."""
    e = entries.astype(np.uint64)
    return ((e * np.uint64(0x9E3779B1) + np.uint64((disk + 1) * 0x85EBCA77))
            & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _block_crcs(buf, nblocks: int) -> np.ndarray:
    mv = memoryview(buf)
    return np.fromiter(map(_crc, (mv[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]
                                  for j in range(nblocks))), dtype=np.uint32, count=nblocks)


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


class Disk:
    """One member: its file, its state, its counters and its checksums (in memory)."""

    def __init__(self, index: int, path: str):
        self.index = index
        self.path = path
        self.fd: int | None = None
        self.state = "missing"  # active | rebuilding | failed | missing
        self.problem = ""  # why it is not active, for status and errors
        self.rebuild_pos = 0  # rows rebuilt so far (state "rebuilding")
        self.durable_pos = 0  # rows rebuilt and fsynced: what superblocks may record
        self.read_errors = 0
        self.write_errors = 0
        self.cksum_errors = 0  # checksum mismatches repaired
        self.unrecoverable = 0  # damaged blocks that could not be rebuilt
        self.crcs: np.ndarray | None = None
        self.crc_ok: np.ndarray | None = None
        self.dirty_cs: set[int] = set()

    def readable(self, e0: int, e1: int, cb: int) -> bool:
        if self.fd is None:
            return False
        if self.state == "active":
            return True
        return self.state == "rebuilding" and -(-e1 // cb) <= self.rebuild_pos

    def writable(self) -> bool:
        return self.fd is not None and self.state in ("active", "rebuilding")

    def counters(self) -> dict:
        return {"read_errors": self.read_errors, "write_errors": self.write_errors,
                "cksum_errors": self.cksum_errors, "unrecoverable": self.unrecoverable}

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def _disk_size(fd: int) -> int:
    size = os.fstat(fd).st_size
    return size if size else os.lseek(fd, 0, os.SEEK_END)


class Array:
    """A RAID-5 array of member disks; implements BlockDevice. Use `create_array` or
    `open_array` to get one and `close()` it when done (clean shutdown)."""

    def __init__(self, dirpath: str, cfg: dict, geo: Geometry, disks: list[Disk],
                 events: int, lockfd: int):
        self.dir = dirpath
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
        self._bmfd = os.open(os.path.join(dirpath, BITMAP_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        self._pool = ThreadPoolExecutor(max_workers=geo.ndisks, thread_name_prefix="raid")
        self._bits = np.zeros(geo.nregions, dtype=bool)  # write-intent bits as on disk
        self._written_cur: set[int] = set()  # regions written since the last flush began
        self._written_prev: set[int] = set()
        self._untrusted_rows: set[int] = set()
        self._counters_dirty = False
        self._closed = False
        self.scrub_progress: dict | None = None
        self._scratch = bytearray(0)  # reused for full-stripe writes (no page faults)
        self._rscratch = bytearray(0)  # reused as the target of healthy reads
        self._skip = bytearray(0)  # where healthy reads put parity chunks they pass
        self.stats = {"bitmap_syncs": 0, "flushes": 0, "resynced_rows": 0}

    # ----------------------------------------------------------------- member I/O

    def _disk_error(self, disk: Disk, op: str, err: object) -> None:
        """A member failed an I/O: count it, mark it failed, tell the others."""
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
            except _DiskGone:
                pass

    def _pread(self, disk: Disk, pblock: int, nblocks: int) -> bytearray:
        want = nblocks * BLOCK_SIZE
        buf = bytearray(want)
        try:
            got = os.preadv(disk.fd, [buf], pblock * BLOCK_SIZE)
        except OSError as exc:
            self._disk_error(disk, "read", exc)
            raise _DiskGone from None
        if got != want:
            self._disk_error(disk, "read", "short read (image truncated?)")
            raise _DiskGone
        return buf

    def _pwrite(self, disk: Disk, pblock: int, data) -> None:
        try:
            n = os.pwrite(disk.fd, data, pblock * BLOCK_SIZE)
            if n != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            self._disk_error(disk, "write", exc)
            raise _DiskGone from None

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

        for bad in self._pool.map(one, jobs):
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
            try:
                sbmod.write_both(d.fd, sb, self.geo.disk_blocks)
            except OSError as exc:
                self._disk_error(d, "write", exc)
        if sync:
            self._fsync_disks(targets)
        self._counters_dirty = False

    # ----------------------------------------------------------------- checksums

    def _cs_block_crc(self, disk: int, j: int, payload) -> int:
        return _crc(payload, (disk * 0x1000193 + j * 0x9E3779B1 + 0x5EED) & 0xFFFFFFFF)

    def _load_checksums(self, disk: Disk) -> int:
        """Read `disk`'s checksum area; entries of a damaged checksum block are marked
        unknown (repaired later from parity). Returns the number of damaged blocks."""
        g = self.geo
        raw = self._pread(disk, g.cs_start, g.cs_blocks)
        per = CRC_ENTRIES_PER_BLOCK
        crcs = np.zeros(g.cs_blocks * per, dtype=np.uint32)
        ok = np.ones(g.cs_blocks * per, dtype=bool)
        damaged = 0
        for j in range(g.cs_blocks):
            blk = memoryview(raw)[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]
            stored = int.from_bytes(blk[-4:], "little")
            if self._cs_block_crc(disk.index, j, blk[:-4]) != stored:
                ok[j * per:(j + 1) * per] = False
                damaged += 1
                disk.dirty_cs.add(j)
            else:
                crcs[j * per:(j + 1) * per] = np.frombuffer(blk[:-4], dtype="<u4")
        # in memory: the plain crc32c of each block (the salt is applied on disk only)
        disk.crcs = crcs[:g.entries] ^ _mix(disk.index, np.arange(g.entries))
        disk.crc_ok = ok[:g.entries].copy()
        return damaged

    def _cs_image(self, disk: Disk, j: int) -> bytes:
        per = CRC_ENTRIES_PER_BLOCK
        e0 = j * per
        part = disk.crcs[e0:e0 + per]
        part = part ^ _mix(disk.index, np.arange(e0, e0 + len(part)))
        payload = part.astype("<u4").tobytes().ljust(per * 4, b"\0")
        return payload + self._cs_block_crc(disk.index, j, payload).to_bytes(4, "little")

    def _write_checksums(self) -> None:
        """Write every changed checksum block (no fsync)."""
        for d in self.disks:
            if not d.dirty_cs or not d.writable():
                continue
            js = sorted(d.dirty_cs)
            d.dirty_cs.clear()
            # group consecutive blocks into one pwrite
            start = prev = js[0]
            runs = []
            for j in js[1:]:
                if j != prev + 1:
                    runs.append((start, prev + 1))
                    start = j
                prev = j
            runs.append((start, prev + 1))
            try:
                for a, b in runs:
                    self._pwrite(d, self.geo.cs_start + a,
                                 b"".join(self._cs_image(d, j) for j in range(a, b)))
            except _DiskGone:
                continue

    def _set_crcs(self, disk: Disk, e0: int, buf, n: int) -> None:
        disk.crcs[e0:e0 + n] = _block_crcs(buf, n)
        disk.crc_ok[e0:e0 + n] = True
        per = CRC_ENTRIES_PER_BLOCK
        disk.dirty_cs.update(range(e0 // per, (e0 + n - 1) // per + 1))

    def _verify(self, disk: Disk, e0: int, buf, n: int) -> list[int]:
        """Indexes (relative to e0) of blocks whose crc does not match or is unknown."""
        got = _block_crcs(buf, n)
        bad = (got != disk.crcs[e0:e0 + n]) | ~disk.crc_ok[e0:e0 + n]
        if not bad.any():
            return []
        return np.nonzero(bad)[0].tolist()

    # ----------------------------------------------------------------- bitmap

    def _bitmap_image(self) -> bytes:
        g = self.geo
        nbytes = BITS_PER_BITMAP_BLOCK // 8
        packed = np.packbits(self._bits, bitorder="little").tobytes()
        out = []
        for j in range(g.bitmap_blocks):
            payload = packed[j * nbytes:(j + 1) * nbytes].ljust(nbytes, b"\0")
            out.append(payload + _crc(payload, j).to_bytes(4, "little"))
        return b"".join(out)

    def _write_bitmap(self, sync: bool) -> None:
        """Write the bits to the bitmap file in DIR (made durable when `sync`: one fsync
        of a small file, which does not force out the members' data) and, lazily, to
        every member's bitmap area (a second copy, durable with the next flush)."""
        image = self._bitmap_image()
        for d in self.disks:
            if d.writable():
                try:
                    self._pwrite(d, self.geo.bitmap_start, image)
                except _DiskGone:
                    pass
        try:
            os.pwrite(self._bmfd, image, 0)
            if sync:
                os.fsync(self._bmfd)
        except OSError as exc:
            raise RaidError(f"cannot write the write-intent bitmap "
                            f"{os.path.join(self.dir, BITMAP_NAME)}: {exc.strerror}") from None

    def _parse_bitmap(self, raw: bytes) -> np.ndarray:
        """Bits from a bitmap image; a damaged or missing block counts as all set."""
        g = self.geo
        nbytes = BITS_PER_BITMAP_BLOCK // 8
        bits = []
        for j in range(g.bitmap_blocks):
            blk = memoryview(raw)[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]
            if len(blk) < BLOCK_SIZE or \
                    _crc(blk[:nbytes], j) != int.from_bytes(blk[nbytes:nbytes + 4], "little"):
                bits.append(np.ones(nbytes * 8, dtype=bool))
            else:
                bits.append(np.unpackbits(np.frombuffer(blk[:nbytes], dtype=np.uint8),
                                          bitorder="little").astype(bool))
        return np.concatenate(bits)[:g.nregions]

    def _read_bitmap(self, disk: Disk) -> np.ndarray:
        return self._parse_bitmap(self._pread(disk, self.geo.bitmap_start,
                                              self.geo.bitmap_blocks))

    def _read_bitmap_file(self) -> np.ndarray:
        return self._parse_bitmap(os.pread(self._bmfd, self.geo.bitmap_blocks * BLOCK_SIZE, 0))

    def _ensure_bits(self, rows) -> None:
        """Make the write-intent bits of `rows` durable before their data is written.
        When a new region directly follows a set one (a sequential writer), the next
        few regions are set in the same fsync round, as readahead for bits."""
        regions = {r // self.geo.region_rows for r in rows}
        self._written_cur.update(regions)
        new = [r for r in regions if not self._bits[r]]
        if new:
            for r in list(new):
                if r > 0 and self._bits[r - 1]:
                    new.extend(range(r + 1, min(self.geo.nregions, r + 1 + BITMAP_LOOKAHEAD)))
            self._bits[new] = True
            self._write_bitmap(sync=True)
            self.stats["bitmap_syncs"] += 1
            crash_point("raid.after_bitmap_set")

    def _needs_bits(self, rows) -> bool:
        rr = self.geo.region_rows
        return any(not self._bits[r // rr] for r in rows)

    # ----------------------------------------------------------------- reading

    def _fetch(self, cache: dict, d: int, e0: int, e1: int):
        """Raw contents of member d over entries e0..e1 and the indexes that fail their
        checksum, or None if the member cannot be read there. Cached per operation."""
        key = (d, e0, e1)
        if key in cache:
            return cache[key]
        disk = self.disks[d]
        res = None
        if disk.readable(e0, e1, self.geo.cb):
            try:
                buf = self._pread(disk, self.geo.data_start + e0, e1 - e0)
            except _DiskGone:
                buf = None
            if buf is not None:
                res = (np.frombuffer(buf, dtype=np.uint8), self._verify(disk, e0, buf, e1 - e0))
        cache[key] = res
        return res

    def _prefetch(self, cache: dict, jobs) -> None:
        """Read (and verify) several members' ranges in parallel, into `cache`. Worker
        threads only read and checksum; failures are handled here, under the lock."""
        g = self.geo
        todo = []
        for d, e0, e1 in jobs:
            disk = self.disks[d]
            if (d, e0, e1) not in cache and disk.readable(e0, e1, g.cb):
                todo.append((disk, disk.fd, e0, e1))
        if len(todo) < 2:
            return

        def one(job):
            disk, fd, e0, e1 = job
            buf = bytearray((e1 - e0) * BLOCK_SIZE)
            try:
                got = os.preadv(fd, [buf], (g.data_start + e0) * BLOCK_SIZE)
            except OSError as exc:
                return job, None, exc
            if got != len(buf):
                return job, None, "short read (image truncated?)"
            return job, buf, _block_crcs(buf, e1 - e0)

        for (disk, _, e0, e1), buf, res in self._pool.map(one, todo):
            if buf is None:
                self._disk_error(disk, "read", res)
                cache[(disk.index, e0, e1)] = None
                continue
            got = res
            bad = (got != disk.crcs[e0:e1]) | ~disk.crc_ok[e0:e1]
            cache[(disk.index, e0, e1)] = (np.frombuffer(buf, dtype=np.uint8),
                                           np.nonzero(bad)[0].tolist() if bad.any() else [])

    def _readahead(self, disks, e0: int, e1: int) -> None:
        """Ask the kernel to start reading entries e0..e1 of these members (the next
        step of a rebuild or scrub) while this step is computed and written."""
        if e1 <= e0:
            return
        for d in disks:
            disk = self.disks[d]
            if disk.fd is not None:
                try:
                    os.posix_fadvise(disk.fd, (self.geo.data_start + e0) * BLOCK_SIZE,
                                     (e1 - e0) * BLOCK_SIZE, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass

    def _block_from(self, cache: dict, d: int, e: int):
        """One verified block of member d at entry e (a view), or None."""
        for (dd, a, b), res in cache.items():
            if dd == d and a <= e < b and res is not None and (e - a) not in res[1]:
                return res[0][(e - a) * BLOCK_SIZE:(e - a + 1) * BLOCK_SIZE]
        res = self._fetch(cache, d, e, e + 1)
        if res is None or res[1]:
            return None
        return res[0]

    def _reconstruct_one(self, cache: dict, k: int, e: int):
        if e // self.geo.cb in self._untrusted_rows:
            return None
        acc = np.zeros(BLOCK_SIZE, dtype=np.uint8)
        for d in range(self.geo.ndisks):
            if d == k:
                continue
            blk = self._block_from(cache, d, e)
            if blk is None:
                return None
            acc ^= blk
        return acc

    def _get(self, cache: dict, k: int, e0: int, e1: int) -> tuple[np.ndarray, list[int]]:
        """Verified contents of member k over entries e0..e1 -> (buffer, lost indexes).

        Damaged blocks are rebuilt from the others, checked, written back and counted;
        an unreadable member is reconstructed. Indexes in `lost` could not be recovered
        (their bytes in the buffer are meaningless)."""
        n = e1 - e0
        res = self._fetch(cache, k, e0, e1)
        disk = self.disks[k]
        if res is None:
            acc = np.zeros(n * BLOCK_SIZE, dtype=np.uint8)
            lost: set[int] = set()
            for d in range(self.geo.ndisks):
                if d == k:
                    continue
                other = self._fetch(cache, d, e0, e1)
                if other is None:
                    return acc, list(range(n))
                acc ^= other[0]
                lost.update(other[1])
            if self._untrusted_rows:
                cb = self.geo.cb
                lost.update(i for i in range(n) if (e0 + i) // cb in self._untrusted_rows)
            return acc, sorted(lost)
        buf, bad = res
        if not bad:
            return buf, []
        if not buf.flags.writeable:
            buf = buf.copy()
        lost_list = []
        for i in bad:
            e = e0 + i
            rec = self._reconstruct_one(cache, k, e)
            mine = buf[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            if rec is None:
                lost_list.append(i)
                disk.unrecoverable += 1
                self._counters_dirty = True
                continue
            want = int(disk.crcs[e])
            got = _crc(rec.tobytes())
            if disk.crc_ok[e] and got != want:
                # the stripe disagrees with this block's checksum: nothing is trustworthy
                lost_list.append(i)
                disk.unrecoverable += 1
                self._counters_dirty = True
                continue
            if disk.crc_ok[e] or not np.array_equal(rec, mine):
                disk.cksum_errors += 1
                self._counters_dirty = True
                try:
                    self._pwrite(disk, self.geo.data_start + e, rec.tobytes())
                except _DiskGone:
                    pass
            self._set_crcs(disk, e, rec.tobytes(), 1)
            mine[:] = rec
        cache[(k, e0, e1)] = (buf, lost_list)
        return buf, lost_list

    def _raise_lost(self, k: int, e0: int, lost: list[int], why: str = "") -> None:
        e = e0 + lost[0]
        lb = self.geo.lblock_of_entry(k, e)
        reason = why or (f"cannot be read or rebuilt (disk {k} at stripe {e} and another "
                         f"disk of that stripe are unusable or damaged)")
        raise BlockIOError(lb, reason)

    def read_sync(self, start: int, count: int) -> bytes:
        """Logical blocks start..start+count-1 (synchronous core of read_blocks)."""
        check_range(self, start, count)
        if count == 0:
            return b""
        g = self.geo
        # the pieces, each within one chunk: (row, role, off, n, output index)
        pieces = []
        lb, left, pos = start, count, 0
        while left:
            row, role, off = g.locate(lb)
            n = min(left, g.cb - off)
            pieces.append((row, role, off, n, pos))
            lb += n
            left -= n
            pos += n
        # the entry range each member must supply
        need: dict[int, list[int]] = {}
        for row, role, off, n, _ in pieces:
            d = g.data_disk(row, role)
            e = row * g.cb + off
            r = need.setdefault(d, [e, e + n])
            r[0] = min(r[0], e)
            r[1] = max(r[1], e + n)
        # when a member must be reconstructed, read everything over one common range so
        # that each member is read once
        with self._lock:
            self._check_open()
            if all(self.disks[d].readable(a, b, g.cb) for d, (a, b) in need.items()):
                fast = self._read_fast(pieces, count)
                if fast is not None:
                    return fast
            if any(not self.disks[d].readable(a, b, g.cb) for d, (a, b) in need.items()):
                lo = min(a for a, _ in need.values())
                hi = max(b for _, b in need.values())
                need = {d: [lo, hi] for d in need}
            cache: dict = {}
            jobs = [(d, a, b) for d, (a, b) in need.items()]
            if any(not self.disks[d].readable(a, b, g.cb) for d, a, b in jobs):
                lo, hi = jobs[0][1], jobs[0][2]
                jobs = [(d, lo, hi) for d in range(g.ndisks)]
            self._prefetch(cache, jobs)
            got = {d: self._get(cache, d, a, b) for d, (a, b) in need.items()}
            out = []
            for row, role, off, n, p in pieces:
                d = g.data_disk(row, role)
                a = need[d][0]
                buf, lost = got[d]
                i0 = row * g.cb + off - a
                for i in lost:
                    if i0 <= i < i0 + n:
                        self._raise_lost(d, a, [i])
                out.append(buf[i0 * BLOCK_SIZE:(i0 + n) * BLOCK_SIZE])
            return b"".join(out)

    # ----------------------------------------------------------------- writing

    def write_sync(self, blocks: Mapping[int, bytes]) -> None:
        """Synchronous core of write_blocks."""
        check_write(self, blocks)
        self._write_checked(blocks)

    def _write_checked(self, blocks: Mapping[int, bytes]) -> None:
        if not blocks:
            return
        g = self.geo
        dpr = g.data_per_row
        if len(blocks) <= SMALL_WRITE:
            # a few blocks (a log write, one operation's pages): plain Python, as numpy's
            # per-call cost is larger than the work here
            per_row = Counter(lb // dpr for lb in blocks)
            rows = sorted(per_row)
            full = [r for r in rows if per_row[r] == dpr]
            partial: dict[int, dict[tuple[int, int], bytes]] = {
                r: {} for r in rows if per_row[r] != dpr}
            if partial:
                for lb, data in blocks.items():
                    if lb // dpr in partial:
                        row, role, off = g.locate(lb)
                        partial[row][(role, off)] = data
        else:
            keys = np.fromiter(blocks, dtype=np.int64, count=len(blocks))
            rows_of = keys // dpr
            uniq, counts = np.unique(rows_of, return_counts=True)
            rows = uniq.tolist()
            full = uniq[counts == dpr].tolist()
            partial = {r: {} for r in uniq[counts != dpr].tolist()}
            if partial:
                for lb in keys[np.isin(rows_of, list(partial))].tolist():
                    row, role, off = g.locate(lb)
                    partial[row][(role, off)] = blocks[lb]
        with self._lock:
            self._check_writable()
            self._ensure_bits(rows)
            # runs of consecutive whole rows are full-stripe writes
            i = 0
            while i < len(full):
                j = i
                while j + 1 < len(full) and full[j + 1] == full[j] + 1:
                    j += 1
                r0, r1 = full[i], full[j] + 1
                first = r0 * dpr
                n = (r1 - r0) * dpr * BLOCK_SIZE
                if len(self._scratch) < n:
                    self._scratch = bytearray(n)
                mv = memoryview(self._scratch)
                for lb in range(first, r1 * dpr):
                    o = (lb - first) * BLOCK_SIZE
                    mv[o:o + BLOCK_SIZE] = blocks[lb]
                self._write_full_rows(r0, r1, self._scratch)
                i = j + 1
            for row in sorted(partial):
                self._write_row(row, partial[row])

    def write_bytes_sync(self, offset: int, data: bytes) -> None:
        """Write bytes at a byte offset of the logical space (partial blocks are
        read-modify-written); for `replfs raid write` and tools."""
        if offset < 0 or offset + len(data) > self.nblocks * BLOCK_SIZE:
            raise RaidError(f"write of {len(data)} bytes at offset {offset} does not fit in "
                            f"the array ({self.nblocks * BLOCK_SIZE} bytes)")
        if not data:
            return
        first = offset // BLOCK_SIZE
        last = (offset + len(data) - 1) // BLOCK_SIZE
        step = 1024  # blocks per batch
        b = first
        while b <= last:
            e = min(last + 1, b + step)
            lo, hi = b * BLOCK_SIZE, e * BLOCK_SIZE
            if lo < offset or hi > offset + len(data):
                buf = bytearray(self.read_sync(b, e - b))
                s = max(lo, offset)
                t = min(hi, offset + len(data))
                buf[s - lo:t - lo] = data[s - offset:t - offset]
            else:
                buf = data[lo - offset:hi - offset]
            mv = memoryview(buf)
            self.write_sync({b + i: bytes(mv[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
                             for i in range(e - b)})
            b = e

    def _read_fast(self, pieces, count: int) -> bytes | None:
        """The healthy read: each member preadv()s its data chunks straight into the
        output (parity chunks are not read), in parallel, and checks them. Returns None
        if anything is amiss (the general path then repairs or reconstructs)."""
        g = self.geo
        if len(self._rscratch) < count * BLOCK_SIZE:
            self._rscratch = bytearray(count * BLOCK_SIZE)
        omv = memoryview(self._rscratch)
        # disk -> [[e_start, nblocks, [(view, entry or -1 for a skipped parity chunk)]]]
        # Parity chunks between data chunks are read into a throwaway buffer rather than
        # skipped: a gap in the pattern would defeat the kernel's readahead.
        runs: dict[int, list] = {}
        if len(self._skip) < g.chunk:
            self._skip = bytearray(g.chunk)
        skip = memoryview(self._skip)
        for row, role, off, n, p in pieces:
            d = g.data_disk(row, role)
            e = row * g.cb + off
            view = omv[p * BLOCK_SIZE:(p + n) * BLOCK_SIZE]
            lst = runs.setdefault(d, [])
            if lst and len(lst[-1][2]) < 1000:
                end = lst[-1][0] + lst[-1][1]
                if end < e <= end + g.cb:
                    lst[-1][2].append((skip[:(e - end) * BLOCK_SIZE], -1))
                    lst[-1][1] += e - end
                    end = e
                if end == e:
                    lst[-1][1] += n
                    lst[-1][2].append((view, e))
                    continue
            lst.append([e, n, [(view, e)]])

        def one(item):
            d, lst, fd = item
            disk = self.disks[d]
            for e, n, parts in lst:
                try:
                    got = os.preadv(fd, [v for v, _ in parts], (g.data_start + e) * BLOCK_SIZE)
                except OSError:
                    return False
                if got != n * BLOCK_SIZE:
                    return False
                for v, pe in parts:
                    if pe < 0:
                        continue
                    k = len(v) // BLOCK_SIZE
                    if (_block_crcs(v, k) != disk.crcs[pe:pe + k]).any() or \
                            not disk.crc_ok[pe:pe + k].all():
                        return False
            return True

        items = [(d, lst, self.disks[d].fd) for d, lst in runs.items()]
        if len(items) == 1:
            ok = one(items[0])
        else:
            ok = all(self._pool.map(one, items))
        return bytes(omv[:count * BLOCK_SIZE]) if ok else None

    def read_bytes_sync(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.nblocks * BLOCK_SIZE:
            raise RaidError(f"read of {length} bytes at offset {offset} is outside the array "
                            f"({self.nblocks * BLOCK_SIZE} bytes)")
        if not length:
            return b""
        first = offset // BLOCK_SIZE
        last = (offset + length - 1) // BLOCK_SIZE
        data = self.read_sync(first, last - first + 1)
        return data[offset - first * BLOCK_SIZE:offset - first * BLOCK_SIZE + length]

    def _write_seg(self, d: int, e0: int, buf) -> None:
        disk = self.disks[d]
        if not disk.writable():
            return
        try:
            self._pwrite(disk, self.geo.data_start + e0, buf)
        except _DiskGone:
            return
        self._set_crcs(disk, e0, buf, len(buf) // BLOCK_SIZE)

    def _write_full_rows(self, r0: int, r1: int, data) -> None:
        """Full-stripe write of rows r0..r1-1: parity from the new data, no reads. Each
        member gets one pwritev of views into `data` and the parity (no copies), all
        members in parallel."""
        g = self.geo
        nrows = r1 - r0
        n1 = g.ndisks - 1
        x = np.frombuffer(data, dtype=np.uint8, count=nrows * n1 * g.chunk)
        x = x.reshape(nrows, n1, g.chunk)
        parity = np.bitwise_xor.reduce(x.view(np.uint64), axis=1).view(np.uint8)
        e0 = r0 * g.cb
        jobs = []
        for d in range(g.ndisks):
            disk = self.disks[d]
            if not disk.writable():
                continue
            roles = g.roles_of_disk(d, r0, r1)
            views = [parity[i] if role < 0 else x[i, role] for i, role in enumerate(roles)]
            jobs.append((disk, disk.fd, views))
        iov_max = 1024

        def one(job):
            disk, fd, views = job
            try:
                off = (g.data_start + e0) * BLOCK_SIZE
                for i in range(0, len(views), iov_max):
                    part = views[i:i + iov_max]
                    want = len(part) * g.chunk
                    if os.pwritev(fd, part, off) != want:
                        raise OSError(errno.ENOSPC, "short write")
                    off += want
            except OSError as exc:
                return job, exc
            crcs = np.concatenate([_block_crcs(v, g.cb) for v in views])
            return job, crcs

        for (disk, _, _), res in self._pool.map(one, jobs):
            if isinstance(res, Exception):
                self._disk_error(disk, "write", res)
                continue
            n = nrows * g.cb
            disk.crcs[e0:e0 + n] = res
            disk.crc_ok[e0:e0 + n] = True
            per = CRC_ENTRIES_PER_BLOCK
            disk.dirty_cs.update(range(e0 // per, (e0 + n - 1) // per + 1))
        crash_point("raid.after_full_stripe")

    def _write_row(self, row: int, items: dict[tuple[int, int], bytes]) -> None:
        """Partial-stripe write of one row: RMW or reconstruct-write, whichever reads less.

        A block already lost (damaged on two members of its stripe) on a member that can
        still be read is kept as it is and stays marked bad; parity is then computed from
        what the members hold (reconstruct-write), so that every other block of the
        stripe stays recoverable. A lost block that would have to be reconstructed (its
        member is unreadable) makes the write fail: raising is the only safe answer."""
        g = self.geo
        n1 = g.ndisks - 1
        offs = [off for _, off in items]
        lo, hi = min(offs), max(offs) + 1
        m = hi - lo
        touched: dict[int, list[int]] = {}
        for role, off in items:
            touched.setdefault(role, []).append(off)
        full = {r for r, o in touched.items() if len(o) == m}
        partial = set(touched) - full
        untouched = set(range(n1)) - set(touched)
        pd = g.parity_disk(row)
        e0 = row * g.cb + lo
        cache: dict = {}
        lost_at: dict[int, set[int]] = {}  # member -> lost indexes (relative to e0)

        def get(d):
            buf, lost = self._get(cache, d, e0, e0 + m)
            if lost:
                if not self.disks[d].readable(e0, e0 + m, g.cb):
                    self._raise_lost(d, e0, lost)
                lost_at[d] = set(lost)
            return buf

        # the new contents of each touched data chunk over lo..hi
        new: dict[int, np.ndarray] = {}
        for role in touched:
            if role in partial:
                buf = get(g.data_disk(row, role)).copy()
            else:
                buf = np.empty(m * BLOCK_SIZE, dtype=np.uint8)
            new[role] = buf
        for (role, off), data in items.items():
            i = off - lo
            new[role][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = np.frombuffer(data, np.uint8)

        def rcw():
            par = np.zeros(m * BLOCK_SIZE, dtype=np.uint8)
            for role in range(n1):
                par ^= new[role] if role in new else get(g.data_disk(row, role))
            return par

        def rmw():
            par = get(pd).copy()
            for role, buf in new.items():
                par ^= get(g.data_disk(row, role))
                par ^= buf
            return par

        parity = None
        if self.disks[pd].writable():
            first, second = (rcw, rmw) if len(untouched) + len(partial) <= len(touched) + 1 \
                else (rmw, rcw)
            try:
                parity = first()
            except BlockIOError:
                lost_at.clear()
                parity = second()
            if lost_at and first is rmw:
                parity = rcw()  # RMW over a lost block would spread the damage
        for role, buf in new.items():
            self._write_seg(g.data_disk(row, role), e0, buf.data)
        crash_point("raid.between_data_and_parity")
        if parity is not None:
            self._write_seg(pd, e0, parity.data)
        # lost blocks that were rewritten as they were must keep failing their checksum
        for d, lost in lost_at.items():
            role = g.role(row, d)
            if d == pd and parity is not None:
                continue
            disk = self.disks[d]
            for i in lost:
                if role in touched and (lo + i) in touched[role]:
                    continue
                e = e0 + i
                try:
                    blk = self._pread(disk, g.data_start + e, 1)
                except _DiskGone:
                    continue
                disk.crcs[e] = _crc(blk) ^ 0xFFFFFFFF
                disk.crc_ok[e] = True
                disk.dirty_cs.add(e // CRC_ENTRIES_PER_BLOCK)
        if sum(1 for d in self.disks if not d.writable()) > 1:
            raise BlockIOError(g.lblock(row, min(touched), lo),
                               "write failed: two or more disks of the array are unusable")

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
        return self.read_sync(start, count)

    async def write_blocks(self, blocks: Mapping[int, bytes]) -> None:
        await trio.lowlevel.checkpoint()
        check_write(self, blocks)
        dpr = self.geo.data_per_row
        if len(blocks) <= SMALL_WRITE:
            rows = sorted({lb // dpr for lb in blocks})
        else:
            rows = np.unique(np.fromiter(blocks, dtype=np.int64, count=len(blocks))
                             // dpr).tolist()
        if self._needs_bits(rows):
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
        await trio.to_thread.run_sync(self._fsync_disks)
        with self._lock:
            self._after_fsync(snap)

    def flush_sync(self) -> None:
        with self._lock:
            self._check_open()
            snap = self._before_fsync()
            self._fsync_disks()
            self._after_fsync(snap)

    def _before_fsync(self) -> set[int]:
        self.stats["flushes"] += 1
        self._write_checksums()
        if self._counters_dirty:
            self._write_superblocks(sync=False)
        snap = self._written_cur
        self._written_cur = set()
        return snap

    def _after_fsync(self, snap: set[int]) -> None:
        keep = snap | self._written_prev | self._written_cur
        keep |= {r // self.geo.region_rows for r in self._untrusted_rows}
        self._written_prev = snap
        clear = [r for r in np.nonzero(self._bits)[0].tolist() if r not in keep]
        if clear:
            self._bits[clear] = False
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
                    self._bits[:] = False
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
                os.close(self._bmfd)

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
                    "events": self.events, "dirty_regions": int(self._bits.sum()),
                    "disks": disks, "scrub": self.scrub_progress or state.get("scrub"),
                    "stats": dict(self.stats),
                    "notices": list(self.notices[-20:])}

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

    def rebuild(self, k: int, image: str | None = None,
                progress: Callable[[int, int], None] | None = None,
                batch_rows: int | None = None) -> dict:
        """Rebuild member k (failed, missing, stale or replaced) from the others, online:
        other threads may read and write meanwhile. With `image`, the member is moved to
        that path (created if missing) and the config updated. Returns a summary."""
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
            fd = self._open_target(path)
            self._write_checksums()
            self._fsync_disks()
            disk.close()
            disk.fd = fd
            disk.path = path
            disk.state = "rebuilding"
            disk.problem = ""
            disk.rebuild_pos = disk.durable_pos = 0
            disk.crcs = np.zeros(g.entries, dtype=np.uint32)
            disk.crc_ok = np.zeros(g.entries, dtype=bool)
            disk.dirty_cs = set(range(g.cs_blocks))
            if image:
                self.cfg["disks"][k] = self._config_path(path)
                write_json(os.path.join(self.dir, CONFIG_NAME), self.cfg)
            self._write_bitmap(sync=False)
            self._write_superblocks(sync=True)
        batch = batch_rows or max(1, REBUILD_BATCH // g.chunk)
        lost_total = 0
        t0 = time.monotonic()
        last_sb = t0
        row = 0
        while row < g.rows:
            r1 = min(g.rows, row + batch)
            with self._lock:
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
                except _DiskGone:
                    raise RaidError(f"rebuild of disk {k} stopped: cannot write {path}: "
                                    f"{disk.problem}") from None
                self._set_crcs(disk, e0, acc.data, e1 - e0)
                for i in lost:  # make them fail their checksum: never serve wrong bytes
                    disk.crcs[e0 + i] ^= 0xFFFFFFFF
                    disk.unrecoverable += 1
                lost_total += len(lost)
                disk.rebuild_pos = r1
                if time.monotonic() - last_sb > REBUILD_PERSIST_SECS:
                    self._write_checksums()
                    self._fsync_disks([disk])
                    disk.durable_pos = disk.rebuild_pos
                    self._write_superblocks(sync=False)
                    last_sb = time.monotonic()
            row = r1
            crash_point("raid.rebuild_step")
            if progress:
                progress(row, g.rows)
        with self._lock:
            self._write_checksums()
            self._fsync_disks()
            disk.state = "active"
            disk.rebuild_pos = 0
            self._write_superblocks(sync=True)
            self.notices.append(f"disk {k} rebuilt onto {path}")
        secs = time.monotonic() - t0
        return {"disk": k, "path": path, "rows": g.rows, "seconds": secs,
                "bytes": g.entries * BLOCK_SIZE, "lost_blocks": lost_total}

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
        size = _disk_size(fd)
        if size < need:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, need)
            else:
                os.close(fd)
                raise RaidError(f"{path} has {size} bytes; a member of this array needs "
                                f"{need}")
        return fd

    def scrub(self, progress: Callable[[int, int], None] | None = None,
              repair: bool = True, batch_rows: int | None = None) -> dict:
        """Read every stripe, verify every checksum and the parity, repair what can be.
        Returns what was found. Runs online (per batch of rows under the lock)."""
        g = self.geo
        batch = batch_rows or max(1, REBUILD_BATCH // g.chunk)
        before = [d.cksum_errors for d in self.disks]
        found = {"rows": g.rows, "blocks_checked": 0, "parity_mismatches": 0,
                 "parity_repaired": 0, "unrecoverable": 0, "cksum_repaired": {},
                 "started": time.time()}
        self.scrub_progress = {"state": "running", "row": 0, "rows": g.rows,
                               "started": found["started"]}
        update_state(self.dir, scrub=self.scrub_progress)
        last = time.monotonic()
        row = 0
        while row < g.rows:
            r1 = min(g.rows, row + batch)
            with self._lock:
                self._check_open()
                e0, e1 = row * g.cb, r1 * g.cb
                cache: dict = {}
                self._prefetch(cache, [(d, e0, e1) for d in range(g.ndisks)])
                self._readahead(range(g.ndisks), e1, min(g.rows, r1 + batch) * g.cb)
                bufs = {}
                lost: set[int] = set()
                for d in range(g.ndisks):
                    if self.disks[d].readable(e0, e1, g.cb):
                        buf, dl = self._get(cache, d, e0, e1)
                        bufs[d] = buf
                        lost.update(dl)
                        found["blocks_checked"] += e1 - e0
                found["unrecoverable"] += len(lost)
                if len(bufs) == g.ndisks:
                    acc = np.zeros((e1 - e0) * BLOCK_SIZE, dtype=np.uint8)
                    for buf in bufs.values():
                        acc ^= buf
                    per = acc.reshape(e1 - e0, BLOCK_SIZE).any(axis=1)
                    bad = [i for i in np.nonzero(per)[0].tolist() if i not in lost]
                    found["parity_mismatches"] += len(bad)
                    if bad and repair:
                        self._ensure_bits(range(row, r1))
                        for i in bad:
                            e = e0 + i
                            pd = g.parity_disk(e // g.cb)
                            blk = acc[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] ^ \
                                bufs[pd][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                            self._write_seg(pd, e, blk.tobytes())
                            found["parity_repaired"] += 1
            row = r1
            if progress:
                progress(row, g.rows)
            self.scrub_progress["row"] = row
            if time.monotonic() - last > 1.0:
                update_state(self.dir, scrub=self.scrub_progress)
                last = time.monotonic()
        self.flush_sync()
        found["cksum_repaired"] = {d.index: d.cksum_errors - b
                                   for d, b in zip(self.disks, before) if d.cksum_errors - b}
        found["finished"] = time.time()
        found["skipped_disks"] = [d.index for d in self.disks if d.state != "active"]
        self.scrub_progress = {"state": "done", "row": g.rows, "rows": g.rows,
                               "started": found["started"], "finished": found["finished"],
                               "found": {k: v for k, v in found.items()
                                         if k not in ("started", "finished")}}
        update_state(self.dir, scrub=self.scrub_progress)
        return found

    # ----------------------------------------------------------------- opening

    def _resync(self, rows: list[int]) -> int:
        """Make the given rows consistent after an unclean stop: checksums from the data
        found, parity from the data. Needs every member."""
        g = self.geo
        for row in rows:
            e0 = row * g.cb
            pd = g.parity_disk(row)
            acc = np.zeros(g.chunk, dtype=np.uint8)
            for d in range(g.ndisks):
                disk = self.disks[d]
                buf = self._pread(disk, g.data_start + e0, g.cb)
                if d != pd:
                    acc ^= np.frombuffer(buf, dtype=np.uint8)
                    self._set_crcs(disk, e0, buf, g.cb)
            self._write_seg(pd, e0, acc.data)
        return len(rows)

    def _repair_unknown_checksums(self) -> int:
        """Entries whose checksum block was damaged: check the block against the stripe,
        repair it if needed, and recompute the checksum."""
        g = self.geo
        fixed = 0
        for disk in self.disks:
            if disk.crc_ok is None or disk.state != "active" or disk.crc_ok.all():
                continue
            unknown = np.nonzero(~disk.crc_ok)[0]
            # by runs of whole chunks
            for row in sorted(set((unknown // g.cb).tolist())):
                e0 = row * g.cb
                cache: dict = {}
                _, lost = self._get(cache, disk.index, e0, e0 + g.cb)
                fixed += 1
                if lost:
                    self.notices.append(
                        f"disk {disk.index}: checksums of row {row} were damaged and "
                        f"{len(lost)} blocks cannot be verified (degraded stripe)")
        return fixed
