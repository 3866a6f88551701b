"""Data operations of `FileSystem`: read, write, truncate (`setattr`'s size, in
fs/core.py) and fsync.

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
            if node.mode & (stat.S_ISUID | stat.S_ISGID):
                node.mode &= ~stat.S_ISUID
                if node.mode & stat.S_IXGRP:
                    node.mode &= ~stat.S_ISGID
            await op.put(ino, node)
            return [len(data), before, version(node)] if stamps else len(data)
        if not data:
            return [0, None, None] if stamps else 0
        return await self._run("write", fn)

    async def fsync(self, ino: int | None = None) -> None:
        """Return when every committed operation so far is on stable storage. Raises
        FsError(EIO) (and enters failsafe mode) if the log cannot be written."""
        try:
            await self.mgr.force()
        except (TxnManagerFailed, OSError) as exc:
            self._enter_failsafe(exc)
            raise FsError(errno.EIO, f"the log cannot be written: {exc}") from None
