"""Where everything lives on one member disk, and the RAID-5 block mapping.

Every member disk has the same layout, in `block_size` (4 KiB) blocks::

    block 0                  superblock, copy A
    1 .. 1+BM                write-intent bitmap, lazy copy (the durable one is DIR/bitmap)
    .. +CS                   checksum area: one crc32c per data-area block (CS blocks)
    data_start ..            data area: `rows` chunk rows of `chunk` bytes each
                             (data_start is aligned to the chunk size)
    ...                      (unused tail, if the disk size is not a whole number of rows)
    block T-1                superblock, copy B

The data area is split into chunk rows. Row r has its parity chunk on disk
``(n-1) - (r mod n)`` and its data chunks i = 0..n-2 on disks ``(p + 1 + i) mod n``:
Linux md's left-symmetric layout, so that a sequential read touches every disk in turn.
Because row r sits at the same place on every disk, "entry" e = r*chunk_blocks + offset
names the same stripe position on every disk, and the checksum area is indexed by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 4096
# One checksum block holds this many crc32c entries and, in its last 4 bytes, the crc32c of
# the rest (so that a damaged checksum block is itself detected).
CRC_ENTRIES_PER_BLOCK = BLOCK_SIZE // 4 - 1
# One bitmap block holds this many bits, plus its own crc32c in the last 4 bytes.
BITS_PER_BITMAP_BLOCK = (BLOCK_SIZE - 4) * 8
# A write-intent bit covers about this much logical space (md's bitmap chunk): coarse enough
# that sequential writes set a bit (an fsync) rarely, fine enough that resync after a crash
# is quick.
BITMAP_REGION_BYTES = 16 << 20


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    ndisks: int
    chunk: int  # bytes
    block_size: int
    disk_blocks: int  # T: size of every member in blocks
    cb: int  # blocks per chunk
    region_rows: int  # chunk rows per write-intent bit
    bitmap_start: int
    bitmap_blocks: int
    cs_start: int
    cs_blocks: int
    data_start: int
    rows: int

    @property
    def data_per_row(self) -> int:
        """Logical blocks per chunk row."""
        return self.cb * (self.ndisks - 1)

    @property
    def nblocks(self) -> int:
        """Logical blocks of the array."""
        return self.rows * self.data_per_row

    @property
    def entries(self) -> int:
        return self.rows * self.cb

    @property
    def nregions(self) -> int:
        return _ceil_div(self.rows, self.region_rows)

    def parity_disk(self, row: int) -> int:
        return (self.ndisks - 1) - (row % self.ndisks)

    def data_disk(self, row: int, role: int) -> int:
        return (self.parity_disk(row) + 1 + role) % self.ndisks

    def role(self, row: int, disk: int) -> int:
        """Data index of `disk` in `row`, or -1 if it holds the row's parity."""
        p = self.parity_disk(row)
        if disk == p:
            return -1
        return (disk - p - 1) % self.ndisks

    def locate(self, lblock: int) -> tuple[int, int, int]:
        """Logical block -> (row, data index, offset in chunk)."""
        row, within = divmod(lblock, self.data_per_row)
        role, off = divmod(within, self.cb)
        return row, role, off

    def lblock(self, row: int, role: int, off: int) -> int:
        return row * self.data_per_row + role * self.cb + off

    def lblock_of_entry(self, disk: int, entry: int) -> int:
        """The logical block stored at `entry` of `disk` (for parity: the stripe's first)."""
        row, off = divmod(entry, self.cb)
        return self.lblock(row, max(self.role(row, disk), 0), off)

    def roles_of_disk(self, disk: int, r0: int, r1: int) -> np.ndarray:
        """Data index of `disk` for rows r0..r1-1 (-1 where it holds parity)."""
        rows = np.arange(r0, r1)
        p = (self.ndisks - 1) - (rows % self.ndisks)
        roles = (disk - p - 1) % self.ndisks
        roles[p == disk] = -1
        return roles

    def area_of(self, disk: int, pblock: int) -> str:
        """Which area a physical block of `disk` belongs to (for fault injection)."""
        if pblock == 0 or pblock == self.disk_blocks - 1:
            return "superblock"
        if self.bitmap_start <= pblock < self.bitmap_start + self.bitmap_blocks:
            return "bitmap"
        if self.cs_start <= pblock < self.cs_start + self.cs_blocks:
            return "checksum"
        if self.data_start <= pblock < self.data_start + self.entries:
            row = (pblock - self.data_start) // self.cb
            return "parity" if self.parity_disk(row) == disk else "data"
        return "unused"


def make_geometry(ndisks: int, chunk: int, disk_blocks: int,
                  block_size: int = BLOCK_SIZE) -> Geometry:
    """Compute the layout; raises ValueError when the parameters cannot make an array."""
    if ndisks < 3:
        raise ValueError(f"RAID-5 needs at least 3 disks, not {ndisks}")
    if block_size != BLOCK_SIZE:
        raise ValueError(f"block size must be {BLOCK_SIZE}")
    if chunk < block_size or chunk % block_size or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= {block_size} bytes, not {chunk}")
    cb = chunk // block_size
    rows_max = max(0, (disk_blocks - 2) // cb)
    bitmap_blocks = max(1, _ceil_div(rows_max, BITS_PER_BITMAP_BLOCK))
    cs_blocks = max(1, _ceil_div(rows_max * cb, CRC_ENTRIES_PER_BLOCK))
    cs_start = 1 + bitmap_blocks
    data_start = _ceil_div(cs_start + cs_blocks, cb) * cb
    rows = (disk_blocks - 1 - data_start) // cb
    if rows < 1:
        raise ValueError(
            f"a disk of {disk_blocks * block_size} bytes is too small for chunk {chunk}: "
            f"it needs at least {(data_start + cb + 1) * block_size} bytes")
    region_rows = max(1, BITMAP_REGION_BYTES // (chunk * (ndisks - 1)))
    return Geometry(ndisks=ndisks, chunk=chunk, block_size=block_size,
                    disk_blocks=disk_blocks, cb=cb, region_rows=region_rows,
                    bitmap_start=1, bitmap_blocks=bitmap_blocks, cs_start=cs_start,
                    cs_blocks=cs_blocks, data_start=data_start, rows=rows)
