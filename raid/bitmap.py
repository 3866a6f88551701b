"""The write-intent bitmap, as md's: what closes the RAID-5 write hole.

One bit per region of chunk rows (about 16 MiB of logical space,
`layout.BITMAP_REGION_BYTES`). Its durable copy is the small file DIR/bitmap (like md's
external bitmap file), so that making a bit durable costs the fsync of one 4 KiB file, not
of every member (an fsync of a member would also force out all its dirty data); every
member also carries a copy in its bitmap area, written lazily (the array writes those).

Before the first write to a region its bit is set and the bitmap file fsynced; later
writes to that region cost nothing extra, and a sequential writer sets the next few
regions at once (`BITMAP_LOOKAHEAD`). Bits are cleared lazily: after a `flush()`, a region
that was not written during that flush interval nor the one before is cleared (no fsync:
a bit lost in a crash only costs a needless resync). On opening after an unclean stop,
every row of every set region is resynchronised (assemble.py).

Image format: `bitmap_blocks` blocks of `BITS_PER_BITMAP_BLOCK` bits each (bit i of a
block is bit i%8 of byte i//8), then the block's crc32c (seeded by its index) in its last
4 bytes. A damaged or missing block counts as all set.
"""

from __future__ import annotations

import os

import crc32c
import numpy as np

from .errors import RaidError
from .layout import BITS_PER_BITMAP_BLOCK, BLOCK_SIZE, Geometry

_crc = crc32c.crc32c
BITMAP_LOOKAHEAD = 3  # regions set ahead of a sequential writer


class WriteIntentBitmap:
    """The bits (`bits`, as last written), which regions were written in the current and
    the previous flush interval, and the durable bitmap file at `path` (kept open;
    `close()` it)."""

    def __init__(self, geo: Geometry, path: str):
        self.geo = geo
        self.path = path
        self.bits = np.zeros(geo.nregions, dtype=bool)
        self._written_cur: set[int] = set()  # regions written since the last flush began
        self._written_prev: set[int] = set()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def close(self) -> None:
        os.close(self._fd)

    # ------------------------------------------------------------- images

    def image(self) -> bytes:
        g = self.geo
        nbytes = BITS_PER_BITMAP_BLOCK // 8
        packed = np.packbits(self.bits, bitorder="little").tobytes()
        out = []
        for j in range(g.bitmap_blocks):
            payload = packed[j * nbytes:(j + 1) * nbytes].ljust(nbytes, b"\0")
            out.append(payload + _crc(payload, j).to_bytes(4, "little"))
        return b"".join(out)

    def parse(self, raw: bytes) -> np.ndarray:
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

    def read_file(self) -> np.ndarray:
        """The bits of the durable copy."""
        return self.parse(os.pread(self._fd, self.geo.bitmap_blocks * BLOCK_SIZE, 0))

    def write_file(self, image: bytes, sync: bool) -> None:
        """Write `image` to the bitmap file, fsynced when `sync`; RaidError if it cannot."""
        try:
            os.pwrite(self._fd, image, 0)
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            raise RaidError(f"cannot write the write-intent bitmap "
                            f"{self.path}: {exc.strerror}") from None

    # ------------------------------------------------------------- bits

    def needs(self, rows) -> bool:
        """Whether writing `rows` would set a bit."""
        rr = self.geo.region_rows
        return any(not self.bits[r // rr] for r in rows)

    def mark(self, rows) -> bool:
        """Note that `rows` are about to be written and set their bits (and, after a set
        region, the next few: readahead for a sequential writer). Returns whether any bit
        was set: then the caller must write the bitmap, synced, before the data."""
        regions = {r // self.geo.region_rows for r in rows}
        self._written_cur.update(regions)
        new = [r for r in regions if not self.bits[r]]
        if not new:
            return False
        for r in list(new):
            if r > 0 and self.bits[r - 1]:
                new.extend(range(r + 1, min(self.geo.nregions, r + 1 + BITMAP_LOOKAHEAD)))
        self.bits[new] = True
        return True

    def start_interval(self) -> set[int]:
        """A flush begins: the regions written in the interval that ends (give them back
        to `clear_idle` once the flush's fsync is done)."""
        snap = self._written_cur
        self._written_cur = set()
        return snap

    def clear_idle(self, snap: set[int], keep: set[int]) -> bool:
        """After the fsync of a flush: clear the bits of regions written neither in the
        interval `snap` nor the one before nor since, and not in `keep`. Returns whether
        any bit was cleared (the caller then writes the bitmap, without sync)."""
        keep = keep | snap | self._written_prev | self._written_cur
        self._written_prev = snap
        clear = [r for r in np.nonzero(self.bits)[0].tolist() if r not in keep]
        if clear:
            self.bits[clear] = False
        return bool(clear)
