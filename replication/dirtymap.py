"""The primary's persistent dirty map: which logical blocks a returning backup may lack
(as DRBD's bitmap with its activity log).

The map is a set of logical blocks and a *base*, a backup position (primary
incarnation, LSN), with one promise:

    every block that a commit after the base changed -- a commit of the base's
    incarnation after its LSN, or any commit of this server since -- is in the map.

So a backup whose durable position is in the base's incarnation at or after its LSN
holds the primary's state except for blocks of the map, and needs only those (plus
what is forwarded meanwhile): an incremental transfer. Any other backup gets every
allocated block. Too big is harmless; missing a block is not, hence:

- marks are written before the commit can reach any disk: `mark` runs synchronously
  when the transaction manager appends the record (`TxnManager.on_append`), before any
  log write and before the forward to the backup is sent. A commit the primary later
  loses in a crash stays marked: its forward may have reached the backup.
- the base moves forward only to a position the backup reported *forced* (`rebase`),
  and only blocks whose last mark is at or before it are cleared; the new base is
  written before the bits it clears.
- a server that applies another primary's stream (it becomes a backup) invalidates its
  map (`invalidate`): its own marks no longer describe its state.

After a failover, the old primary comes back as the backup of the new one, DRBD's
"merge the bitmaps" case. The new primary holds its old primary's state up to a
position it had forced, its *origin* (`promoted`, recorded when it is promoted with an
invalidated map), plus its own commits, all marked. The old primary holds the same
state up to its own base, plus its commits after it, all in its own marks -- including
commits it appended but lost in its crash (marks are written first), whose forwards the
new primary may have applied. So where the old primary's base is in the origin's
incarnation at or before the origin's LSN, the union of the two maps holds every block
in which the two states may differ (`merges`), and the old primary receives only those:
an incremental transfer. The origin goes with the first rebase (the marks from before
it are cleared) and with `invalidate`.

The file, `dirty.map` next to the array's images: a header block (msgpack: base, the
machine's boot id, clean flag, block count), then one bit per logical block. Marks are
*written*, not forced: they survive `kill -9` of the server (the page cache keeps them,
in order with the log) but not a power loss. A file that was not closed cleanly under
an earlier boot of the machine is therefore not trusted (the base is dropped: the next
backup gets a full transfer), as is one of another array size.
"""

from __future__ import annotations

import logging
import os

import msgpack

log = logging.getLogger("replfs.server")

HEADER = 4096
VERSION = 1


def boot_id() -> str:
    """This boot of the machine (a power loss or a reboot changes it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class DirtyMap:
    def __init__(self, path: str, nblocks: int):
        self.path = path
        self.nblocks = nblocks
        self.base: tuple[str, int] | None = None
        self.origin: tuple[str, int] | None = None    # see above: `promoted`
        self.bits = bytearray((nblocks + 7) // 8)
        self.last: dict[int, int] = {}      # block -> LSN of its last mark (0: earlier)
        self.boot = boot_id()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._load()
        self._write_header(clean=False)

    # ---------------------------------------------------------------- file
    def _load(self) -> None:
        raw = os.pread(self.fd, HEADER, 0)
        try:
            n = int.from_bytes(raw[:2], "little")
            h = msgpack.unpackb(raw[2:2 + n]) if n else None
        except Exception:
            h = None
        if not isinstance(h, dict) or h.get("v") != VERSION or h.get("nblocks") != self.nblocks:
            if h is not None:
                log.warning("dirty map %s: not this array's; starting without one", self.path)
            self._zero_file()
            return
        if h.get("boot") != self.boot and not h.get("clean"):
            log.warning("dirty map %s: the machine went down while it was open (marks may "
                        "be lost); the next backup gets a full transfer", self.path)
            self._zero_file()
            return
        bits = os.pread(self.fd, len(self.bits), HEADER)
        self.bits[:len(bits)] = bits
        base, origin = h.get("base"), h.get("origin")
        self.base = (str(base[0]), int(base[1])) if base else None
        self.origin = (str(origin[0]), int(origin[1])) if origin else None
        for i, byte in enumerate(self.bits):
            if byte:
                for j in range(8):
                    if byte >> j & 1:
                        self.last[i * 8 + j] = 0

    def _zero_file(self) -> None:
        self.base = self.origin = None
        self.bits[:] = bytes(len(self.bits))
        self.last.clear()
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, HEADER + len(self.bits))

    def _write_header(self, clean: bool) -> None:
        body = msgpack.packb(dict(v=VERSION, nblocks=self.nblocks, boot=self.boot,
                                  clean=clean, base=list(self.base) if self.base else None,
                                  origin=list(self.origin) if self.origin else None))
        os.pwrite(self.fd, (len(body).to_bytes(2, "little") + body).ljust(HEADER, b"\0"), 0)

    def _write_bits(self, lo: int, hi: int) -> None:
        """Write bytes [lo, hi) of the bitmap."""
        if lo < hi:
            os.pwrite(self.fd, bytes(self.bits[lo:hi]), HEADER + lo)

    def close(self) -> None:
        """A clean stop: force the map and say so (it is then trusted after a reboot)."""
        if self.fd < 0:
            return
        os.fsync(self.fd)
        self._write_header(clean=True)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    # ---------------------------------------------------------------- the map
    def __len__(self) -> int:
        return len(self.last)

    def blocks(self) -> list[int]:
        return sorted(self.last)

    def covers(self, position: tuple[str, int]) -> bool:
        """Does the map hold every block a backup at `position` (forced) may lack?"""
        return (self.base is not None and bool(position[0])
                and position[0] == self.base[0] and position[1] >= self.base[1])

    def merges(self, base) -> bool:
        """Does the union of this map and a returning old primary's own map, whose base
        is `base`, hold every block in which its state may differ from ours?"""
        return (self.origin is not None and isinstance(base, (list, tuple)) and len(base) == 2
                and isinstance(base[0], str) and isinstance(base[1], int) and bool(base[0])
                and base[0] == self.origin[0] and base[1] <= self.origin[1])

    def promoted(self, position: tuple[str, int]) -> None:
        """This server becomes primary holding its old primary's state up to `position`
        (forced), plus nothing of its own yet: with an invalidated map (it followed that
        primary), `position` becomes the origin for a returning old primary."""
        if self.base is None and not self.last and position[0]:
            self.origin = (position[0], int(position[1]))
            self._write_header(clean=False)

    def mark(self, blocks, lsn: int) -> None:
        """Blocks a commit (at `lsn`) changes; written before the call returns."""
        lo, hi = len(self.bits), 0
        last = self.last
        for b in blocks:
            if b not in last and 0 <= b < self.nblocks:
                i = b >> 3
                self.bits[i] |= 1 << (b & 7)
                lo, hi = min(lo, i), max(hi, i + 1)
            last[b] = lsn
        self._write_bits(lo, hi)

    def rebase(self, incarnation: str, lsn: int) -> int:
        """The backup holds, forced, everything up to `lsn` of `incarnation` (the
        primary's own, whose commits `mark` saw with their LSNs): make that the base and
        clear what is older. Returns the number of blocks cleared."""
        if self.base == (incarnation, lsn):
            return 0
        self.base = (incarnation, lsn)
        self.origin = None                    # marks from before it go now
        self._write_header(clean=False)       # the new base first, then the clears
        old = [b for b, at in self.last.items() if at <= lsn]
        if not old:
            return 0
        lo, hi = len(self.bits), 0
        for b in old:
            del self.last[b]
            i = b >> 3
            self.bits[i] &= ~(1 << (b & 7)) & 0xFF
            lo, hi = min(lo, i), max(hi, i + 1)
        self._write_bits(lo, hi)
        return len(old)

    def settle(self) -> None:
        """A new incarnation begins (a promotion): every mark so far is older than any
        of its commits."""
        for b in self.last:
            self.last[b] = 0

    def invalidate(self) -> None:
        """This server's state is about to follow another primary: drop base and marks."""
        if self.base is None and self.origin is None and not self.last:
            return
        self.base = self.origin = None
        self.last.clear()
        self.bits[:] = bytes(len(self.bits))
        self._write_header(clean=False)
        self._write_bits(0, len(self.bits))
