"""The per-block checksum store of one member disk: on disk, cached within a bound.

Every block of a member's data area has a crc32c, kept in the member's checksum area
(layout.py): `CRC_ENTRIES_PER_BLOCK` entries per 4 KiB checksum block ("page"), and in its
last 4 bytes the crc32c of the rest, seeded by the member and the page's place, so that a
damaged page is itself detected. On disk each entry is XORed with a salt of its member and
position (`_mix`), so that a page copied to the wrong place (or disk) does not verify its
blocks; in memory the store holds the plain crc32c.

The checksum area is the truth; the store keeps at most `cache_pages` pages in memory, in
least-recently-used order (one page covers 1023 blocks, 4 MiB of the member), so that a
server's memory is set by its cache size and not by its disks (1 GiB per TiB if every
checksum were held). A page is read on first use; a page that changed ("dirty") is written
back when it is evicted or at the array's `flush()` (before its fsync), always after the
data it describes, since the store learns a checksum only once its block was written.
Until the flush's fsync the write-intent bit of the row covers both (bitmap.py): after a
crash the row's checksums are recomputed from whatever data landed.

An entry whose page was damaged is "unknown": its block verifies against nothing until it
is checked against parity and its checksum recomputed. A page that still holds unknown
entries is written with a trailer it fails, so that after its eviction or a restart all of
its entries are checked against parity again rather than trusted. A block known to be lost
(it could not be rebuilt) gets a checksum its bytes fail, so that it is never served as
good.

All calls come from one thread at a time (the array's lock); worker threads only compute
checksums (`block_crcs`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import crc32c
import numpy as np

from .layout import BLOCK_SIZE, CRC_ENTRIES_PER_BLOCK

_crc = crc32c.crc32c
PER = CRC_ENTRIES_PER_BLOCK
# A cached page costs its 1023 crcs (4 KiB) and some bookkeeping.
PAGE_MEMORY = PER * 4 + 256
MIN_PAGES = 4  # per member: a rebuild or scrub batch (8 MiB) spans 3 pages
SCAN_BATCH = 256  # pages per read when the checksum area is scanned at assembly
_A = 0x9E3779B1
_MASK = 0xFFFFFFFF

# read(page, count) -> the pages' bytes, or None if the member could not be read;
# write(page, data) -> whether the member took them
Reader = Callable[[int, int], "bytes | bytearray | None"]
Writer = Callable[[int, bytes], bool]


def block_crcs(buf, nblocks: int) -> np.ndarray:
    """The crc32c of each of the first `nblocks` blocks of `buf`."""
    mv = memoryview(buf)
    return np.fromiter(map(_crc, (mv[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]
                                  for j in range(nblocks))), dtype=np.uint32, count=nblocks)


def _mix(disk: int, entries: np.ndarray) -> np.ndarray:
    """Per-position salt XORed into each crc stored on disk."""
    e = entries.astype(np.uint64)
    return ((e * np.uint64(_A) + np.uint64((disk + 1) * 0x85EBCA77))
            & np.uint64(_MASK)).astype(np.uint32)


def _cs_block_crc(disk: int, j: int, payload) -> int:
    return _crc(payload, (disk * 0x1000193 + j * 0x9E3779B1 + 0x5EED) & _MASK)


class _Page:
    """One checksum block in memory: its crcs, which are known (None: all), changed?"""

    __slots__ = ("crcs", "ok", "dirty")

    def __init__(self, crcs: np.ndarray, ok: np.ndarray | None, dirty: bool):
        self.crcs = crcs
        self.ok = ok
        self.dirty = dirty


class ChecksumStore:
    """The crc32c of each of `entries` data-area blocks of member `disk`, which of them are
    known, read from and written to the member's checksum area through `read` and
    `write` (page numbers relative to the area), at most `cache_pages` pages in memory."""

    def __init__(self, disk: int, entries: int, cs_blocks: int, read: Reader,
                 write: Writer, cache_pages: int):
        self.disk = disk
        self.entries = entries
        self.cs_blocks = cs_blocks
        self.cache_pages = max(MIN_PAGES, cache_pages)
        self._read = read
        self._write = write
        self._pages: OrderedDict[int, _Page] = OrderedDict()
        self._salt0 = _mix(disk, np.arange(PER))  # page j's salt: this + j*PER*_A
        self.stats = {"hits": 0, "misses": 0, "writebacks": 0}

    # ------------------------------------------------------------- on disk

    def _salt(self, j: int) -> np.ndarray:
        return self._salt0 + np.uint32((j * PER * _A) & _MASK)

    def _valid(self, j: int) -> int:
        """How many entries page j holds (the last one may be short)."""
        return min(PER, self.entries - j * PER)

    def _decode(self, j: int, blk) -> _Page | None:
        """Page j from its on-disk bytes, or None if they are damaged."""
        blk = memoryview(blk)
        if _cs_block_crc(self.disk, j, blk[:-4]) != int.from_bytes(blk[-4:], "little"):
            return None
        crcs = np.frombuffer(blk[:-4], dtype="<u4").astype(np.uint32) ^ self._salt(j)
        return _Page(crcs, None, False)

    def _image(self, j: int, page: _Page) -> bytes:
        """Page j as it is written on disk; failing its trailer if it has unknowns."""
        n = self._valid(j)
        part = (page.crcs[:n] ^ self._salt(j)[:n]).astype("<u4")
        payload = part.tobytes().ljust(PER * 4, b"\0")
        trailer = _cs_block_crc(self.disk, j, payload)
        if page.ok is not None:
            trailer ^= _MASK
        return payload + trailer.to_bytes(4, "little")

    def check_pages(self, j0: int, raw) -> list[int]:
        """The damaged pages among pages j0.. whose bytes are `raw` (a scan of the area
        at assembly: nothing is kept)."""
        n = len(raw) // BLOCK_SIZE
        mv = memoryview(raw)
        bad = []
        for i in range(n):
            blk = mv[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            if _cs_block_crc(self.disk, j0 + i, blk[:-4]) != int.from_bytes(blk[-4:], "little"):
                bad.append(j0 + i)
        return bad

    def format(self, crc: int) -> bool:
        """Write every page with every entry `crc` (a new array: all zeros), in batches,
        keeping nothing. Returns whether the member took them."""
        known = _Page(np.full(PER, crc, dtype=np.uint32), None, False)
        for j0 in range(0, self.cs_blocks, SCAN_BATCH):
            j1 = min(self.cs_blocks, j0 + SCAN_BATCH)
            if not self._write(j0, b"".join(self._image(j, known) for j in range(j0, j1))):
                return False
        self._pages.clear()
        return True

    def write_dirty(self) -> None:
        """Write every changed page (runs of consecutive pages in one write; no fsync)."""
        js = sorted(j for j, p in self._pages.items() if p.dirty)
        i = 0
        while i < len(js):
            k = i
            while k + 1 < len(js) and js[k + 1] == js[k] + 1:
                k += 1
            run = js[i:k + 1]
            if self._write(run[0], b"".join(self._image(j, self._pages[j]) for j in run)):
                for j in run:
                    self._pages[j].dirty = False
            i = k + 1

    # ------------------------------------------------------------- the cache

    def _page(self, j: int, whole: bool = False) -> _Page:
        """Page j, read if not cached (not read when `whole`: the caller sets every
        entry). A page that cannot be read or is damaged has every entry unknown."""
        p = self._pages.get(j)
        if p is not None:
            self._pages.move_to_end(j)
            self.stats["hits"] += 1
            return p
        self.stats["misses"] += 1
        if whole:
            p = _Page(np.zeros(PER, dtype=np.uint32), None, False)
        else:
            raw = self._read(j, 1)
            p = self._decode(j, raw) if raw is not None else None
            if p is None:
                ok = np.zeros(PER, dtype=bool)
                ok[self._valid(j):] = True   # past the end: nothing to know
                p = _Page(np.zeros(PER, dtype=np.uint32), ok, False)
        self._pages[j] = p
        while len(self._pages) > self.cache_pages:
            self._evict()
        return p

    def _evict(self) -> None:
        j, p = self._pages.popitem(last=False)
        if p.dirty:
            self.stats["writebacks"] += 1
            self._write(j, self._image(j, p))   # a failed member: nothing to keep

    def cached_pages(self) -> int:
        return len(self._pages)

    # ------------------------------------------------------------- updating

    def put(self, e0: int, crcs: np.ndarray) -> None:
        """Entries e0.. have these checksums (the blocks were just written)."""
        n = len(crcs)
        i = 0
        while i < n:
            j, o = divmod(e0 + i, PER)
            k = min(n - i, PER - o)
            p = self._page(j, whole=(o == 0 and k >= self._valid(j)))
            p.crcs[o:o + k] = crcs[i:i + k]
            if p.ok is not None:
                p.ok[o:o + k] = True
                if p.ok.all():
                    p.ok = None
            p.dirty = True
            i += k

    def set_from(self, e0: int, buf, n: int) -> None:
        """Entries e0..e0+n-1 hold the blocks of `buf`."""
        self.put(e0, block_crcs(buf, n))

    def poison(self, e: int, crc: int) -> None:
        """Entry e is lost and its block holds bytes of checksum `crc`: record a checksum
        those bytes fail, so that they are never served as good."""
        self.put(e, np.array([crc ^ _MASK], dtype=np.uint32))

    # ------------------------------------------------------------- checking

    def expected(self, e: int) -> int | None:
        """The checksum of entry e, or None if it is unknown."""
        j, o = divmod(e, PER)
        p = self._page(j)
        return int(p.crcs[o]) if p.ok is None or p.ok[o] else None

    def mismatches(self, e0: int, got: np.ndarray) -> list[int]:
        """Indexes (relative to e0) where the checksums `got` do not match or are unknown."""
        n = len(got)
        out: list[int] = []
        i = 0
        while i < n:
            j, o = divmod(e0 + i, PER)
            k = min(n - i, PER - o)
            p = self._page(j)
            bad = got[i:i + k] != p.crcs[o:o + k]
            if p.ok is not None:
                bad |= ~p.ok[o:o + k]
            if bad.any():
                out.extend((np.nonzero(bad)[0] + i).tolist())
            i += k
        return out

    def matches(self, e0: int, got: np.ndarray) -> bool:
        """Whether every checksum in `got` is known and matches (entries e0..)."""
        n = len(got)
        j, o = divmod(e0, PER)
        if o + n <= PER:       # the common case: one page
            p = self._page(j)
            return not (got != p.crcs[o:o + n]).any() and (p.ok is None or
                                                          bool(p.ok[o:o + n].all()))
        return not self.mismatches(e0, got)

    def verify(self, e0: int, buf, n: int) -> list[int]:
        """Indexes (relative to e0) of the blocks of `buf` that fail their checksum."""
        return self.mismatches(e0, block_crcs(buf, n))

    def page_entries(self, j: int) -> tuple[int, int]:
        """The entries [a, b) that page j covers."""
        return j * PER, j * PER + self._valid(j)
