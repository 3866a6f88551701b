"""The read path: logical blocks from the members.

A healthy read (every member it needs readable) has each member preadv() its data chunks
straight into the output, in parallel, and checks them against their checksums. Anything
amiss -- a member unreadable or rebuilding there, a checksum that fails -- sends the read
through the general path (reconstruct.py), which repairs damaged blocks and computes an
unreadable member's chunks from the others; a block that cannot be recovered raises
`BlockIOError`, never wrong bytes.
"""

from __future__ import annotations

import os

from .blockdev import check_range
from .checksums import block_crcs
from .errors import RaidError
from .layout import BLOCK_SIZE


class ReadMixin:
    """Part of `Array` (array.py): `read_sync`, `read_bytes_sync`. Uses the array's
    `geo`, `disks`, `nblocks`, `_lock`, `_pool`, its read scratch buffers and the
    reconstruction methods (reconstruct.py)."""

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
            """Read one member's runs; their checksums, or None (worker threads only
            read and checksum: the checksum store is consulted under the lock)."""
            d, lst, fd = item
            sums = []
            for e, n, parts in lst:
                try:
                    got = os.preadv(fd, [v for v, _ in parts], (g.data_start + e) * BLOCK_SIZE)
                except OSError:
                    return None
                if got != n * BLOCK_SIZE:
                    return None
                for v, pe in parts:
                    if pe >= 0:
                        sums.append((pe, block_crcs(v, len(v) // BLOCK_SIZE)))
            return d, sums

        items = [(d, lst, self.disks[d].fd) for d, lst in runs.items()]
        got = [one(items[0])] if len(items) == 1 else list(self._pool.map(one, items))
        for res in got:
            if res is None:
                return None
            cs = self.disks[res[0]].cs
            for pe, crcs in res[1]:
                if not cs.matches(pe, crcs):
                    return None
        return bytes(omv[:count * BLOCK_SIZE])

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
