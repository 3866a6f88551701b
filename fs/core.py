"""The filesystem state machine: every operation is one transaction under strict 2PL.

`FileSystem` is the one interface that the FUSE adapter calls (fs/fuse_ops.py) -- in
process here, through the replication client later. Its methods take and return plain
values (ints, bytes, `Attr`), raise `FsError(errno)` for anything the caller did wrong,
and leave nothing behind when they fail: the transaction is aborted and the in-memory
allocation maps follow (fs/op.py). A deadlock or lock timeout is retried by the
transaction manager; callers never see one.

Locking: an operation locks every inode it reads (S) or changes (X); a directory's inode
lock covers its entries. Allocation maps are not locked: objects are handed out by the
in-memory allocator and their map bytes are disjoint (fs/alloc.py).

This module holds the class itself -- its state and caches (committed inodes, held inode
numbers, ordered mode's recently freed blocks), the running of operations (`_run`,
failsafe mode), lookups and attributes, readdir and statfs -- and the names the rest of
replfs imports from here. Its other operations are mixins in their own modules:
fs/namespace.py (creating, removing and renaming names, orphans), fs/data.py (read,
write, truncate, fsync), fs/xattrs.py (extended attributes, the POSIX ACL refusal) and
fs/parts.py (one group's part of a distributed operation); the plain values (`Attr`,
`Request`, `current_request`) are in fs/values.py.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from typing import Callable

from replfs.fs.alloc import ByteMap
from replfs.fs.data import DataOps
from replfs.fs.errors import FsError
from replfs.fs.layout import (BLOCK_SIZE, NAME_MAX, ORPHAN_SLOT, ROOT_SLOT,
                              S_IFMT, Inode, Superblock, ino_group, ino_slot, make_ino)
from replfs.fs.namespace import LINK_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE, NamespaceOps
from replfs.fs.op import Op
from replfs.fs.parts import Part, PartOps
from replfs.fs.values import Attr, Request, _now, current_request
from replfs.fs.xattrs import XATTR_CREATE, XATTR_REPLACE, XATTR_VALUE_MAX, XattrOps
from replfs.fs import directory
from replfs.txn import TxnAborted, TxnManagerFailed

__all__ = ["FileSystem", "Attr", "Request", "Part", "current_request", "RENAME_NOREPLACE",
           "RENAME_EXCHANGE", "XATTR_CREATE", "XATTR_REPLACE", "LINK_MAX", "XATTR_VALUE_MAX",
           "READDIR_BATCH"]

log = logging.getLogger(__name__)

READDIR_BATCH = 128
COMMITTED_CACHE = 65536     # inodes whose committed state getattr and readdir answer from


class FileSystem(NamespaceOps, DataOps, XattrOps, PartOps):
    """One replica group's filesystem over a transaction manager. Build it with
    `await open_fs(device)` (fs/mkfs.py)."""

    def __init__(self, sb: Superblock, mgr, bmap: ByteMap, imap: ByteMap):
        self.sb = sb
        self.mgr = mgr
        self.bmap = bmap
        self.imap = imap
        self.root_ino = make_ino(sb.group, ROOT_SLOT)
        self.orphan_ino = make_ino(sb.group, ORPHAN_SLOT)
        self._generation = _now() & 0xFFFFFFFF
        self.failsafe: str | None = None
        # Operations commit lazily (durable at the next fsync, or within the flush-behind
        # interval of a mount); False makes every operation force the log.
        self.lazy_commits = True
        # The committed state of recently changed inodes, so that getattr (the most
        # frequent request) needs no transaction. Reading one object's committed value
        # is serializable on its own (it orders the read before any live writer).
        self._committed_inodes: dict[int, Inode] = {}
        # inodes freed while a kernel may still know them by number (an unlink that
        # freed at once): their numbers are not reused before `release_number`, as the
        # FUSE protocol asks (a reply naming the old inode could still be on its way)
        self._held_numbers: set[int] = set()
        self._recent_frees: dict[int, int] = {}         # block -> LSN of the freeing commit
        self._frees_queue: deque[tuple[int, list[int]]] = deque()
        self.frees_settled: Callable[[int], bool] = self._default_frees_settled

    # ---------------------------------------------------------------- ordered mode
    # A file's new data blocks are written in place before the commit, unlogged
    # (Txn.write_fresh). A block freed by a commit that a crash could still take back
    # (not yet forced here -- and on the backup, `frees_settled` of a primary) would
    # then hold the new owner's bytes under the old owner: such a block is logged.

    def _default_frees_settled(self, lsn: int) -> bool:
        return self.mgr.log.durable_lsn > lsn

    def blocks_freed(self, lsn: int, blocks: list[int]) -> None:
        """The commit at `lsn` freed `blocks` (called before they can be reused)."""
        for b in blocks:
            self._recent_frees[b] = lsn
        self._frees_queue.append((lsn, blocks))
        self._settle_frees()

    def _settle_frees(self) -> None:
        q = self._frees_queue
        while q and self.frees_settled(q[0][0]):
            lsn, blocks = q.popleft()
            for b in blocks:
                if self._recent_frees.get(b) == lsn:
                    del self._recent_frees[b]

    def fresh_ok(self, block: int) -> bool:
        """May a new owner write `block` in place (its freeing can no longer be lost)?"""
        if block not in self._recent_frees:
            return True
        self._settle_frees()
        return block not in self._recent_frees

    def numbers_held(self, inos) -> None:
        self._held_numbers.update(inos)

    async def release_number(self, ino: int) -> None:
        """The kernel forgot `ino`, freed earlier with its number held: reuse it."""
        await self.release_numbers([ino])

    async def release_numbers(self, inos: list[int]) -> None:
        """`release_number` of each of `inos` (a client gathers them)."""
        held = [ino for ino in inos if type(ino) is int and ino in self._held_numbers]
        if held:
            self._held_numbers.difference_update(held)
            self.imap.commit_freed([ino_slot(ino) for ino in held])

    def inodes_committed(self, nodes: dict[int, Inode]) -> None:
        """Called after a transaction committed, with the inodes it wrote."""
        cache = self._committed_inodes
        for ino, node in nodes.items():
            if node.mode == 0:
                cache.pop(ino, None)
            else:
                cache[ino] = node
        self._trim_committed()

    def uncache_committed(self, inos) -> None:
        """Forget the committed state of `inos` (a prepared part will change it: until
        it is decided, getattr reads them under their locks)."""
        for ino in inos:
            self._committed_inodes.pop(ino, None)

    def _read_committed(self, ino: int, node: Inode) -> None:
        """`node`, just read under its S lock (still held), is `ino`'s committed state,
        and no commit of it can come in between: the cache stays in commit order."""
        self._committed_inodes[ino] = node
        if len(self._committed_inodes) > COMMITTED_CACHE:
            self._trim_committed()

    def _trim_committed(self) -> None:
        cache = self._committed_inodes
        if len(cache) > COMMITTED_CACHE:
            for ino in list(cache)[:COMMITTED_CACHE // 4]:
                del cache[ino]

    def next_generation(self) -> int:
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        return self._generation

    # ---------------------------------------------------------------- running ops
    async def _run(self, name: str, fn, *args, readonly: bool = False):
        if self.failsafe and not readonly:
            raise FsError(errno.EROFS, f"filesystem in failsafe mode: {self.failsafe}")
        ops: list[Op] = []

        async def attempt(txn):
            if ops:
                ops[-1].aborted()        # the previous attempt was aborted and retried
            op = Op(self, txn)
            ops.append(op)
            result = await fn(op, *args)
            req = current_request.get()
            if req is not None and not readonly:
                if req.before_commit is not None:
                    await req.before_commit(txn, result)
                req.commit = await txn.commit(req.payload(result), durable=req.durable)
            elif self.lazy_commits and not readonly:
                # like a journaling filesystem's write(2): committed (whole or absent
                # after a crash) but durable only at the next fsync or flush-behind
                await txn.commit(durable=False)
            return result

        try:
            result = await self.mgr.run(attempt, name=name)
        except (TxnManagerFailed, TxnAborted, OSError) as exc:
            if ops:
                ops[-1].aborted()
            if not isinstance(exc, TxnManagerFailed) and self.mgr.failed is None:
                raise       # e.g. one unreadable block: EIO for this operation only
            # the log cannot be written any more: stop writing (more damage), keep reading
            self._enter_failsafe(exc)
            raise FsError(errno.EIO, f"the log cannot be written: {exc}") from None
        except BaseException:
            if ops:
                ops[-1].aborted()
            raise
        ops[-1].committed()
        return result

    def _enter_failsafe(self, exc: BaseException) -> None:
        if not self.failsafe:
            self.failsafe = str(exc)
            log.error("filesystem enters failsafe mode (writes refused, reads served): %s", exc)

    # ---------------------------------------------------------------- helpers
    async def _dir(self, op: Op, ino: int, mode: str) -> Inode:
        node = await op.inode(ino, mode)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        if node.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {ino} was removed")
        return node
    # ---------------------------------------------------------------- lookups
    async def lookup(self, parent: int, name: bytes) -> Attr:
        async def fn(op):
            pnode = await self._dir(op, parent, "S")
            if name == b".":
                return Attr.of(parent, pnode)
            if name == b"..":
                pino = pnode.parent or parent
                return Attr.of(pino, await op.inode(pino, "S"))
            if len(name) > NAME_MAX:
                raise FsError(errno.ENAMETOOLONG, "name too long")
            ent = await directory.lookup(op, pnode, name)
            if ent is None:
                raise FsError(errno.ENOENT, name.decode(errors="replace"))
            return Attr.of(ent[0], await op.inode(ent[0], "S"))
        return await self._run("lookup", fn, readonly=True)

    async def getattr(self, ino: int) -> Attr:
        node = self._committed_inodes.get(ino)
        if node is not None:
            return Attr.of(ino, node)

        async def fn(op):
            node = await op.inode(ino, "S")
            self._read_committed(ino, node)
            return Attr.of(ino, node)
        return await self._run("getattr", fn, readonly=True)

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None) -> Attr:
        async def fn(op):
            node = await op.inode(ino, "X")
            now = _now()
            if mode is not None:
                node.mode = (node.mode & S_IFMT) | (mode & 0o7777)
            if uid is not None:
                node.uid = uid
            if gid is not None:
                node.gid = gid
            if size is not None and size != node.size:
                if node.is_dir:
                    raise FsError(errno.EISDIR, "cannot truncate a directory")
                if not node.is_reg:
                    raise FsError(errno.EINVAL, "can only truncate regular files")
                await self._truncate(op, ino, node, size)
                node.mtime_ns = now
            if atime_ns is not None:
                node.atime_ns = atime_ns
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
            node.ctime_ns = now
            await op.put(ino, node)
            return Attr.of(ino, node)
        return await self._run("setattr", fn)

    # ---------------------------------------------------------------- directories
    async def readdir(self, ino: int, start: int, limit: int = READDIR_BATCH):
        """Up to `limit` (name, Attr, next_offset) from offset `start` (0 = beginning).

        For an entry whose inode lives in another replica group the Attr is replaced by
        that inode's number (an int): the caller asks the inode's own group. Each
        entry's attributes are a read of that inode's committed state, as `getattr`'s
        (a hint for the kernel's cache, not locked together with the listing)."""
        committed = self._committed_inodes

        async def fn(op):
            node = await self._dir(op, ino, "S")
            out = []
            for name, cino, typ, nxt in await directory.list_from(op, node, start, limit):
                if ino_group(cino) != self.sb.group:
                    out.append([name, cino, nxt])   # the caller asks the inode's group
                    continue
                cnode = committed.get(cino)
                if cnode is None:
                    cnode = await op.inode(cino, "S")
                    self._read_committed(cino, cnode)
                out.append([name, Attr.of(cino, cnode), nxt])   # (a list: sent as is)
            return out
        return await self._run("readdir", fn, readonly=True)

    async def statfs(self) -> dict:
        sb = self.sb
        return dict(bsize=BLOCK_SIZE, frsize=BLOCK_SIZE, blocks=sb.nblocks - sb.data_start,
                    bfree=self.bmap.nfree, bavail=self.bmap.nfree, files=sb.ninodes - 3,
                    ffree=self.imap.nfree, favail=self.imap.nfree, namemax=NAME_MAX)

    async def close(self) -> None:
        """Checkpoint and close the transaction manager (the device stays open)."""
        await self.mgr.close()
