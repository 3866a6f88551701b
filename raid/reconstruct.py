"""Verified member contents, reconstructed from the other members where needed.

Every read of a member's data area goes through here (except the healthy fast read,
reads.py): each block is checked against its crc32c (checksums.py); a block that fails
is rebuilt from the other members of its stripe, checked again, written back and counted
on that disk (`cksum_errors`, like zpool's CKSUM column); a member that cannot be read at
all is computed from the others (a degraded read). A block that can be neither read nor
rebuilt is "lost": the callers raise `BlockIOError` for it rather than return wrong bytes.

An operation passes one `cache` dict to these methods, so that each member range is
read (and verified) once per operation. All of it runs under the array's lock.
"""

from __future__ import annotations

import os

import crc32c
import numpy as np

from .blockdev import BlockIOError
from .checksums import block_crcs
from .layout import BLOCK_SIZE
from .member import DiskGone


class ReconstructMixin:
    """Part of `Array` (array.py): reading members' ranges, verified, with reconstruction.
    Uses the array's `geo`, `disks`, `_pool`, `_untrusted_rows`, `_pread`, `_pwrite`,
    `_disk_error` and `_counters_dirty`."""

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
            except DiskGone:
                buf = None
            if buf is not None:
                res = (np.frombuffer(buf, dtype=np.uint8), disk.cs.verify(e0, buf, e1 - e0))
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
            return job, buf, block_crcs(buf, e1 - e0)

        for (disk, _, e0, e1), buf, res in self._pool.map(one, todo):
            if buf is None:
                self._disk_error(disk, "read", res)
                cache[(disk.index, e0, e1)] = None
                continue
            cache[(disk.index, e0, e1)] = (np.frombuffer(buf, dtype=np.uint8),
                                           disk.cs.mismatches(e0, res))

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
            want = disk.cs.expected(e)
            if want is not None and crc32c.crc32c(rec.tobytes()) != want:
                # the stripe disagrees with this block's checksum: nothing is trustworthy
                lost_list.append(i)
                disk.unrecoverable += 1
                self._counters_dirty = True
                continue
            if want is not None or not np.array_equal(rec, mine):
                disk.cksum_errors += 1
                self._counters_dirty = True
                try:
                    self._pwrite(disk, self.geo.data_start + e, rec.tobytes())
                except DiskGone:
                    pass
            disk.cs.set_from(e, rec.tobytes(), 1)
            mine[:] = rec
        cache[(k, e0, e1)] = (buf, lost_list)
        return buf, lost_list

    def _raise_lost(self, k: int, e0: int, lost: list[int], why: str = "") -> None:
        e = e0 + lost[0]
        lb = self.geo.lblock_of_entry(k, e)
        reason = why or (f"cannot be read or rebuilt (disk {k} at stripe {e} and another "
                         f"disk of that stripe are unusable or damaged)")
        raise BlockIOError(lb, reason)
