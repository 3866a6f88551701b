"""Data operations of `FileSystem`: read, write, truncate (`setattr`'s size, in
fs/core.py), fallocate and fsync.

Ordered mode: a write's newly allocated blocks are written in place before the commit,
unlogged (fs/core.py, "ordered mode"). `DataOps` is a mixin of `FileSystem`
(fs/core.py): it shares its state and uses its `_run` and `_enter_failsafe`.
"""

from __future__ import annotations

import errno
import stat

from replfs.crash import crash_point
from replfs.fs import blockmap
from replfs.fs.errors import FsError
from replfs.fs.layout import BLOCK_SIZE, MAX_FILE_SIZE, Inode
from replfs.fs.op import Op
from replfs.fs.values import _now
from replfs.txn import TxnManagerFailed

# fallocate(2)'s modes that replfs supports (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_CHUNK = 256      # blocks per fallocate transaction (1 MiB of zeros to write and ship)
# ZERO_RANGE overwrites the blocks a file has, logged with their old bytes: no more per
# transaction than a 128 KiB write logs (a small array's log holds 2 MiB)
ZERO_CHUNK = 32


def _clear_setid(node: Inode) -> None:
    """A write by anyone drops set-user-ID, and set-group-ID where it means that."""
    if node.mode & (stat.S_ISUID | stat.S_ISGID):
        node.mode &= ~stat.S_ISUID
        if node.mode & stat.S_IXGRP:
            node.mode &= ~stat.S_ISGID


def version(node) -> list:
    """What tells one version of a file's contents from another: [generation, mtime,
    ctime, size] (every change of the contents sets ctime)."""
    return [node.generation, node.mtime_ns, node.ctime_ns, node.size]


class DataOps:
    """The data operations of `FileSystem` (a mixin)."""

    async def _truncate(self, op: Op, ino: int, node: Inode, size: int) -> None:
        if size < 0:
            raise FsError(errno.EINVAL, "negative size")
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"size {size} beyond the largest file ({MAX_FILE_SIZE})")
        if size < node.size:
            keep = -(-size // BLOCK_SIZE)
            await blockmap.truncate(op, node, keep)
            tail = size % BLOCK_SIZE
            if tail:
                # zero the dropped part of the last block so a later extension reads zeros
                blk = await blockmap.lookup(op, node, size // BLOCK_SIZE)
                if blk:
                    await op.write_block(blk, tail, bytes(BLOCK_SIZE - tail))
        node.size = size

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        async def fn(op):
            node = await op.inode(ino, "S")
            if node.is_dir:
                raise FsError(errno.EISDIR, "is a directory")
            end = min(offset + size, node.size)
            if offset >= end:
                return b""
            first = offset // BLOCK_SIZE
            last = (end - 1) // BLOCK_SIZE
            blks = await blockmap.lookup_range(op, node, first, last - first + 1)
            zero = bytes(BLOCK_SIZE)
            present = [b for b in blks if b]
            got = iter(await op.txn.read_blocks(present)) if present else iter(())
            buf = b"".join(next(got) if b else zero for b in blks)
            start = offset - first * BLOCK_SIZE
            return buf[start:start + end - offset]
        return await self._run("read", fn, readonly=True)

    async def write(self, ino: int, offset: int, data: bytes, stamps: bool = False):
        """Write `data` at `offset`; the number of bytes written. With `stamps`,
        [bytes written, the file's version before, its version after] instead, both
        read in the write's own transaction (see `version`): a client that knows the
        version before was the one it holds knows nothing else changed the file in
        between (what NFSv3's wcc data tells)."""
        if offset < 0:
            raise FsError(errno.EINVAL, "negative offset")
        if offset + len(data) > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"write beyond the largest file size ({MAX_FILE_SIZE} bytes)")

        async def fn(op):
            node = await op.inode(ino, "X")
            if node.is_dir:
                raise FsError(errno.EISDIR, "is a directory")
            before = version(node) if stamps else None
            end = offset + len(data)
            first = offset // BLOCK_SIZE
            last = (end - 1) // BLOCK_SIZE
            mv = memoryview(data)
            mapped = await blockmap.ensure_range(op, node, first, last - first + 1)
            for idx, (blk, fresh) in zip(range(first, last + 1), mapped):
                bstart = idx * BLOCK_SIZE
                lo = max(offset, bstart)
                hi = min(end, bstart + BLOCK_SIZE)
                seg = mv[lo - offset:hi - offset]
                if fresh:       # ordered mode: in place before the commit, not logged
                    inoff = lo - bstart
                    if len(seg) == BLOCK_SIZE:
                        full = bytes(seg)
                    else:
                        full = bytes(inoff) + bytes(seg) + bytes(BLOCK_SIZE - inoff - len(seg))
                    await op.write_fresh(blk, full)
                else:
                    await op.write_block(blk, lo - bstart, bytes(seg))
            crash_point("fs.write.blocks_written")
            if end > node.size:
                node.size = end
            node.mtime_ns = node.ctime_ns = _now()
            _clear_setid(node)
            await op.put(ino, node)
            return [len(data), before, version(node)] if stamps else len(data)
        if not data:
            return [0, None, None] if stamps else 0
        return await self._run("write", fn)

    async def fallocate(self, ino: int, mode: int, offset: int, length: int,
                        reserve: bool = True) -> int:
        """fallocate(2) of bytes offset..offset+length-1 of regular file `ino`. Mode 0
        allocates the range's holes as zeroed blocks and extends the size to its end;
        KEEP_SIZE the same without the size; PUNCH_HOLE (with KEEP_SIZE) frees the blocks
        wholly inside the range and zeroes the parts of the others; ZERO_RANGE (KEEP_SIZE
        optional) makes the range read as zeros, allocated.

        One call is one transaction of at most FALLOC_CHUNK blocks (ZERO_CHUNK for
        ZERO_RANGE): a long range is several calls, as a long write(2) is several FUSE
        writes. It returns the offset up to which the range is done, and the caller
        calls again from there with `reserve` False until it is offset+length. With `reserve` (the first call) the
        blocks the whole range needs are counted first: ENOSPC, taking nothing, if they
        are not free -- not later at write time. Raises EOPNOTSUPP for other modes,
        EINVAL for a bad range, EFBIG past the largest file, ENODEV for a non-file."""
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        zero = bool(mode & FALLOC_FL_ZERO_RANGE)
        if punch and not mode & FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE")
        if punch and zero:
            raise FsError(errno.EINVAL, "PUNCH_HOLE and ZERO_RANGE together")
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL, f"bad range: offset {offset}, length {length}")
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"range beyond the largest file size ({MAX_FILE_SIZE} bytes)")
        span = ZERO_CHUNK if zero else FALLOC_CHUNK
        stop = min(end, (offset // BLOCK_SIZE + span) * BLOCK_SIZE)

        async def fn(op):
            node = await op.inode(ino, "X")
            if node.is_dir:
                raise FsError(errno.EISDIR, "is a directory")
            if not node.is_reg:
                raise FsError(errno.ENODEV, "fallocate of a file that is not a regular file")
            first = offset // BLOCK_SIZE
            if reserve and not punch:
                want = await blockmap.needed(op, node, first, (end - 1) // BLOCK_SIZE - first + 1)
                if want > self.bmap.nfree:
                    raise FsError(errno.ENOSPC, f"fallocate needs {want} blocks, "
                                                f"{self.bmap.nfree} are free")
            if punch:
                await self._punch(op, node, offset, stop)
            else:
                await self._allocate(op, node, offset, stop, zero)
            now = _now()
            if not mode & FALLOC_FL_KEEP_SIZE and stop > node.size:
                node.size = stop
                node.mtime_ns = now
            if punch or zero:
                node.mtime_ns = now
            node.ctime_ns = now
            _clear_setid(node)
            await op.put(ino, node)
            return stop
        return await self._run("fallocate", fn)

    async def _allocate(self, op: Op, node: Inode, start: int, stop: int, zero: bool) -> None:
        """Allocate the holes of bytes start..stop-1 as zeroed blocks; with `zero`, zero
        the range's bytes in the blocks it already had too."""
        first = start // BLOCK_SIZE
        last = (stop - 1) // BLOCK_SIZE
        mapped = await blockmap.ensure_range(op, node, first, last - first + 1)
        for idx, (blk, fresh) in zip(range(first, last + 1), mapped):
            if fresh:       # ordered mode, as write's new blocks
                await op.write_fresh(blk, bytes(BLOCK_SIZE))
            elif zero:
                lo = max(start, idx * BLOCK_SIZE) - idx * BLOCK_SIZE
                hi = min(stop, (idx + 1) * BLOCK_SIZE) - idx * BLOCK_SIZE
                await op.write_block(blk, lo, bytes(hi - lo))

    async def _punch(self, op: Op, node: Inode, start: int, stop: int) -> None:
        """Free the blocks wholly inside bytes start..stop-1; zero the range's part of
        the (at most two) blocks it covers only in part."""
        first = -(-start // BLOCK_SIZE)         # the first block wholly inside
        end = stop // BLOCK_SIZE                # one past the last wholly inside
        for lo, hi in sorted({(start, min(stop, first * BLOCK_SIZE)),
                              (max(start, end * BLOCK_SIZE), stop)}):
            if lo < hi:
                blk = await blockmap.lookup(op, node, lo // BLOCK_SIZE)
                if blk:
                    await op.write_block(blk, lo % BLOCK_SIZE, bytes(hi - lo))
        if end > first:
            await blockmap.punch(op, node, first, end - first)

    async def fsync(self, ino: int | None = None) -> None:
        """Return when every committed operation so far is on stable storage. Raises
        FsError(EIO) (and enters failsafe mode) if the log cannot be written."""
        try:
            await self.mgr.force()
        except (TxnManagerFailed, OSError) as exc:
            self._enter_failsafe(exc)
            raise FsError(errno.EIO, f"the log cannot be written: {exc}") from None
