"""The per-block checksum store of one member disk.

Every block of a member's data area has a crc32c, kept in the member's checksum area
(layout.py): `CRC_ENTRIES_PER_BLOCK` entries per 4 KiB block, and in its last 4 bytes the
crc32c of the rest, seeded by the member and the block's place, so that a damaged
checksum block is itself detected. On disk each entry is XORed with a salt of its
member and position (`_mix`), so that a checksum block copied to the wrong place (or
disk) does not verify its blocks; in memory the store holds the plain crc32c.

An entry whose checksum block was damaged is "unknown": its block verifies against
nothing until it is checked against parity and its checksum recomputed. A block that is
known to be lost (it could not be rebuilt) gets a checksum its bytes fail, so that it is
never served as good.

The store is in memory (4 bytes and a flag per 4 KiB block); changed checksum blocks are
remembered and written by the array at `flush()`, before its fsync.
"""

from __future__ import annotations

import crc32c
import numpy as np

from .layout import BLOCK_SIZE, CRC_ENTRIES_PER_BLOCK

_crc = crc32c.crc32c


def block_crcs(buf, nblocks: int) -> np.ndarray:
    """The crc32c of each of the first `nblocks` blocks of `buf`."""
    mv = memoryview(buf)
    return np.fromiter(map(_crc, (mv[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]
                                  for j in range(nblocks))), dtype=np.uint32, count=nblocks)


def _mix(disk: int, entries: np.ndarray) -> np.ndarray:
    """Per-position salt XORed into each crc stored on disk."""
    e = entries.astype(np.uint64)
    return ((e * np.uint64(0x9E3779B1) + np.uint64((disk + 1) * 0x85EBCA77))
            & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _cs_block_crc(disk: int, j: int, payload) -> int:
    return _crc(payload, (disk * 0x1000193 + j * 0x9E3779B1 + 0x5EED) & 0xFFFFFFFF)


class ChecksumStore:
    """The crc32c of each of `entries` data-area blocks of member `disk`, which of them are
    known, and which checksum blocks changed since they were last written (`dirty`).

    A new store knows nothing and has every checksum block dirty: fill it with `fill`
    (a new array), `load` (an existing member) or `put` (a rebuilt one)."""

    def __init__(self, disk: int, entries: int, cs_blocks: int):
        self.disk = disk
        self.entries = entries
        self.cs_blocks = cs_blocks
        self.crcs = np.zeros(entries, dtype=np.uint32)
        self.ok = np.zeros(entries, dtype=bool)
        self.dirty: set[int] = set(range(cs_blocks))

    # ------------------------------------------------------------- on disk

    def load(self, raw) -> int:
        """Take the checksum area's contents `raw` (cs_blocks blocks). Entries of a damaged
        checksum block become unknown and that block dirty. Returns how many were damaged."""
        per = CRC_ENTRIES_PER_BLOCK
        crcs = np.zeros(self.cs_blocks * per, dtype=np.uint32)
        ok = np.ones(self.cs_blocks * per, dtype=bool)
        damaged = 0
        self.dirty = set()
        for j in range(self.cs_blocks):
            blk = memoryview(raw)[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]
            stored = int.from_bytes(blk[-4:], "little")
            if _cs_block_crc(self.disk, j, blk[:-4]) != stored:
                ok[j * per:(j + 1) * per] = False
                damaged += 1
                self.dirty.add(j)
            else:
                crcs[j * per:(j + 1) * per] = np.frombuffer(blk[:-4], dtype="<u4")
        self.crcs = crcs[:self.entries] ^ _mix(self.disk, np.arange(self.entries))
        self.ok = ok[:self.entries].copy()
        return damaged

    def block_image(self, j: int) -> bytes:
        """Checksum block j as it is written on disk."""
        per = CRC_ENTRIES_PER_BLOCK
        e0 = j * per
        part = self.crcs[e0:e0 + per]
        part = part ^ _mix(self.disk, np.arange(e0, e0 + len(part)))
        payload = part.astype("<u4").tobytes().ljust(per * 4, b"\0")
        return payload + _cs_block_crc(self.disk, j, payload).to_bytes(4, "little")

    def take_dirty_runs(self) -> list[tuple[int, int]]:
        """The changed checksum blocks as runs [a, b) of consecutive blocks, forgotten
        as changed (the caller writes them)."""
        if not self.dirty:
            return []
        js = sorted(self.dirty)
        self.dirty.clear()
        start = prev = js[0]
        runs = []
        for j in js[1:]:
            if j != prev + 1:
                runs.append((start, prev + 1))
                start = j
            prev = j
        runs.append((start, prev + 1))
        return runs

    # ------------------------------------------------------------- updating

    def fill(self, crc: int) -> None:
        """Every block has checksum `crc` (a new array: all zeros)."""
        self.crcs = np.full(self.entries, crc, dtype=np.uint32)
        self.ok = np.ones(self.entries, dtype=bool)
        self.dirty = set(range(self.cs_blocks))

    def put(self, e0: int, crcs: np.ndarray) -> None:
        """Entries e0.. have these checksums (the blocks were just written)."""
        n = len(crcs)
        self.crcs[e0:e0 + n] = crcs
        self.ok[e0:e0 + n] = True
        per = CRC_ENTRIES_PER_BLOCK
        self.dirty.update(range(e0 // per, (e0 + n - 1) // per + 1))

    def set_from(self, e0: int, buf, n: int) -> None:
        """Entries e0..e0+n-1 hold the blocks of `buf`."""
        self.put(e0, block_crcs(buf, n))

    def poison(self, e: int, crc: int) -> None:
        """Entry e is lost and its block holds bytes of checksum `crc`: record a checksum
        those bytes fail, so that they are never served as good."""
        self.put(e, np.array([crc ^ 0xFFFFFFFF], dtype=np.uint32))

    # ------------------------------------------------------------- checking

    def expected(self, e: int) -> int | None:
        """The checksum of entry e, or None if it is unknown."""
        return int(self.crcs[e]) if self.ok[e] else None

    def mismatches(self, e0: int, got: np.ndarray) -> list[int]:
        """Indexes (relative to e0) where the checksums `got` do not match or are unknown."""
        n = len(got)
        bad = (got != self.crcs[e0:e0 + n]) | ~self.ok[e0:e0 + n]
        if not bad.any():
            return []
        return np.nonzero(bad)[0].tolist()

    def matches(self, e0: int, got: np.ndarray) -> bool:
        """Whether every checksum in `got` is known and matches (entries e0..)."""
        n = len(got)
        return not (got != self.crcs[e0:e0 + n]).any() and bool(self.ok[e0:e0 + n].all())

    def verify(self, e0: int, buf, n: int) -> list[int]:
        """Indexes (relative to e0) of the blocks of `buf` that fail their checksum."""
        return self.mismatches(e0, block_crcs(buf, n))

    def unknown(self) -> np.ndarray:
        """The entries whose checksum is unknown."""
        if self.ok.all():
            return np.zeros(0, dtype=np.int64)
        return np.nonzero(~self.ok)[0]
