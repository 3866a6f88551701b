"""The write path: batches of logical blocks onto the members, parity kept right.

A batch is split into chunk rows. Runs of whole rows are full-stripe writes (parity
computed from the new data alone, one large pwritev per member, all members in
parallel). A partial row is a read-modify-write over the touched offset range: either
"RMW" (read old data of the touched chunks and old parity) or "reconstruct-write" (read
the untouched chunks), whichever reads fewer chunks; a block that cannot be read is
reconstructed from the others (reconstruct.py), so both also work degraded. Before any
data of a row is written, its write-intent bit is durable (bitmap.py).

Parity: numpy XOR on whole buffers (uint8 arrays). Measured on this machine: numpy XOR
of two 1 MiB buffers runs at ~19 GB/s, Python int XOR (with the bytes<->int conversions
it needs) at ~0.3 GB/s, so numpy it is.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from typing import Mapping

import crc32c
import numpy as np

from replfs.crash import crash_point

from .blockdev import BlockIOError, check_write
from .checksums import block_crcs
from .errors import RaidError
from .layout import BLOCK_SIZE
from .member import DiskGone

SMALL_WRITE = 64  # a write of at most this many blocks maps its rows without numpy
RECENT_BLOCKS = 1024    # member blocks remembered from partial-stripe writes (array.py)
RECENT_SEG = 64         # longer segments are not remembered (a chunk of a sequential
                        # write's last partial row is: the next write completes that row)


class WriteMixin:
    """Part of `Array` (array.py): `write_sync`, `write_bytes_sync` and the stripe
    writes under them. Uses the array's `geo`, `disks`, `nblocks`, `_lock`, `_pool`,
    `_scratch`, `_ensure_bits`, `_check_writable`, `_pwrite`, `_disk_error`,
    `read_sync` and the reconstruction methods (reconstruct.py)."""

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

    def _write_seg(self, d: int, e0: int, buf) -> None:
        disk = self.disks[d]
        if not disk.writable():
            return
        try:
            self._pwrite(disk, self.geo.data_start + e0, buf)
        except DiskGone:
            return
        n = len(buf) // BLOCK_SIZE
        disk.cs.set_from(e0, buf, n)
        if n <= RECENT_SEG:
            recent = self._recent
            mv = memoryview(buf).cast("B")
            for i in range(n):
                recent[(d, e0 + i)] = bytes(mv[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
                recent.move_to_end((d, e0 + i))
            while len(recent) > RECENT_BLOCKS:
                recent.popitem(last=False)

    def _forget_recent(self, d: int | None, e0: int, e1: int) -> None:
        """Drop what `_recent` holds of member d's entries e0..e1 (every member: None)."""
        members = range(self.geo.ndisks) if d is None else (d,)
        if (e1 - e0) * len(members) <= len(self._recent):
            for k in members:
                for e in range(e0, e1):
                    self._recent.pop((k, e), None)
        else:
            for key in [k for k in self._recent
                        if (d is None or k[0] == d) and e0 <= k[1] < e1]:
                del self._recent[key]

    def _cached(self, cache: dict, d: int, e0: int, e1: int) -> bool:
        """Put member d's entries e0..e1 into a write's `cache` from `_recent` (as
        `_fetch` would, verified) if all are there."""
        key = (d, e0, e1)
        if key in cache:
            return True
        recent = self._recent
        parts = [recent.get((d, e)) for e in range(e0, e1)]
        if not recent or any(p is None for p in parts):
            return False
        cache[key] = (np.frombuffer(b"".join(parts), dtype=np.uint8), [])
        self.stats["recent_hits"] += 1
        return True

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
        if self._recent:
            self._forget_recent(None, e0, r1 * g.cb)
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
            disk.unsynced = True
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
            crcs = np.concatenate([block_crcs(v, g.cb) for v in views])
            return job, crcs

        for (disk, _, _), res in self._pool.map(one, jobs):
            if isinstance(res, Exception):
                self._disk_error(disk, "write", res)
                continue
            disk.cs.put(e0, res)
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
                if self._recent:
                    self._cached(cache, g.data_disk(row, role), e0, e0 + m)
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
            if self._recent:
                # whichever needs no reads at all: what this array wrote lately
                hi_e = e0 + m
                if all([self._cached(cache, d, e0, hi_e) for d in
                        [pd, *(g.data_disk(row, r) for r in touched)]]):
                    first, second = rmw, rcw
                elif all([self._cached(cache, g.data_disk(row, r), e0, hi_e)
                          for r in untouched]):
                    first, second = rcw, rmw
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
                except DiskGone:
                    continue
                disk.cs.poison(e, crc32c.crc32c(blk))
        if sum(1 for d in self.disks if not d.writable()) > 1:
            raise BlockIOError(g.lblock(row, min(touched), lo),
                               "write failed: two or more disks of the array are unusable")
