"""Block and inode allocation over the on-disk byte maps.

The maps on disk are the truth; this class keeps an in-memory copy (one byte per object)
to find free objects quickly and to make sure two concurrent transactions never get the
same object. The rules that keep it consistent with the log:

- `allocate` marks the object used in memory at once (so nobody else takes it) and
  writes the map byte in the caller's transaction; if that transaction aborts, the caller
  calls `rollback` and the object is free again.
- `free` writes the map byte in the transaction but leaves the object used in memory
  until the transaction commits (`commit`): an aborted free must not have handed the
  object to someone else meanwhile.
"""

from __future__ import annotations

import errno

from replfs.fs.errors import FsError
from replfs.fs.layout import BLOCK_SIZE

FREE = b"\0"
USED = b"\1"


class ByteMap:
    def __init__(self, name: str, start_block: int, count: int, first: int, image: bytearray):
        self.name = name
        self.start_block = start_block
        self.count = count          # objects covered
        self.first = first          # lowest allocatable object
        self.mem = image            # in-memory copy, len == count
        self.hint = first
        self.nfree = self.mem.count(0, first)

    def _locate(self, n: int) -> tuple[int, int]:
        return self.start_block + n // BLOCK_SIZE, n % BLOCK_SIZE

    async def allocate(self, txn, near: int | None = None) -> int:
        start = self.hint if near is None else max(self.first, min(near, self.count - 1))
        n = self.mem.find(FREE, start)
        if n < 0:
            n = self.mem.find(FREE, self.first, start)
        if n < 0:
            raise FsError(errno.ENOSPC, f"no free {self.name}")
        self.mem[n] = 1
        self.nfree -= 1
        self.hint = n + 1 if n + 1 < self.count else self.first
        blk, off = self._locate(n)
        await txn.write(blk, off, USED)
        return n

    async def allocate_run(self, txn, count: int, near: int | None = None) -> list[int]:
        """`count` objects, as few contiguous runs as the free space allows (one map
        write per run). Raises ENOSPC, allocating nothing, if there are not enough."""
        if count > self.nfree:
            raise FsError(errno.ENOSPC, f"no free {self.name}")
        out: list[int] = []
        start = self.hint if near is None else max(self.first, min(near, self.count - 1))
        wrapped = False
        try:
            while len(out) < count:
                n = self.mem.find(FREE, start)
                if n < 0:
                    if wrapped:
                        raise FsError(errno.ENOSPC, f"no free {self.name}")
                    wrapped, start = True, self.first
                    continue
                want = count - len(out)
                end = self.mem.find(USED, n, n + want)
                end = n + want if end < 0 else end
                end = min(end, self.count)
                self.mem[n:end] = USED * (end - n)
                self.nfree -= end - n
                out.extend(range(n, end))
                # one map write per run (it may span two map blocks)
                pos = n
                while pos < end:
                    blk, off = self._locate(pos)
                    stop = min(end, pos + BLOCK_SIZE - off)
                    await txn.write(blk, off, USED * (stop - pos))
                    pos = stop
                start = end
        except BaseException:
            self.rollback_allocated(out)
            raise
        self.hint = out[-1] + 1 if out[-1] + 1 < self.count else self.first
        return out

    async def free(self, txn, n: int) -> None:
        if not self.first <= n < self.count:
            raise FsError(errno.EIO, f"freeing {self.name} {n} out of range")
        blk, off = self._locate(n)
        await txn.write(blk, off, FREE)

    async def free_many(self, txn, ns) -> None:
        """`free` of each of `ns`, with one map write per contiguous run."""
        ns = sorted(ns)
        if ns and not (self.first <= ns[0] and ns[-1] < self.count):
            raise FsError(errno.EIO, f"freeing {self.name} {ns[0]}..{ns[-1]} out of range")
        i = 0
        while i < len(ns):
            j = i + 1
            blk, off = self._locate(ns[i])
            # a run ends at a gap or at the end of the map block
            while j < len(ns) and ns[j] == ns[j - 1] + 1 and off + (j - i) < BLOCK_SIZE:
                j += 1
            await txn.write(blk, off, FREE * (j - i))
            i = j

    async def repair(self, txn, n: int, used: bool) -> bool:
        """fsck: set object `n`'s map byte (on disk, in `txn`, and in memory) to what
        was found; True if it changed. Not for normal allocation (see the class doc)."""
        if bool(self.mem[n]) == used:
            return False
        blk, off = self._locate(n)
        await txn.write(blk, off, USED if used else FREE)
        self.mem[n] = int(used)
        self.nfree += -1 if used else 1
        return True

    def rollback_allocated(self, ns) -> None:
        for n in ns:
            self.mem[n] = 0
            self.nfree += 1

    def commit_freed(self, ns) -> None:
        for n in ns:
            if self.mem[n]:
                self.mem[n] = 0
                self.nfree += 1
