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
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import trio

from replfs.crash import crash_point
from replfs.fs import blockmap, directory
from replfs.fs.alloc import ByteMap
from replfs.fs.errors import FsError, Stale
from replfs.fs.layout import (BLOCK_SIZE, INLINE_MAX, MAX_FILE_SIZE, NAME_MAX, ORPHAN_SLOT,
                              ROOT_SLOT, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, SYMLINK_MAX,
                              XATTR_NAME_MAX, Inode, Superblock, ino_group, ino_slot,
                              make_ino)
from replfs.fs.op import Op
from replfs.txn import TxnAborted, TxnManagerFailed

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
LINK_MAX = 65000
XATTR_VALUE_MAX = 3500
READDIR_BATCH = 128


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int          # in 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int

    @classmethod
    def of(cls, ino: int, n: Inode) -> "Attr":
        return cls(ino, n.mode, n.nlink, n.uid, n.gid, n.rdev, n.size, n.blocks * 8,
                   n.atime_ns, n.mtime_ns, n.ctime_ns, n.generation)


@dataclass
class Request:
    """Set (in `current_request`) by a replication server around one client operation.

    The operation's transaction then commits with `payload(result)` as its commit
    payload (e.g. the client id, sequence number and reply, for at-most-once), and leaves
    its `CommitRecord` (txn/) in `commit`, so that the server can forward exactly that
    transaction to its backup before answering. Read-only operations commit nothing and
    leave `commit` None."""
    payload: Callable[[Any], Any]
    commit: Any = None
    # False: commit lazily (the server makes it written -- `mgr.write()` -- and held by
    # its backup before answering); True: force the commit
    durable: bool = True
    # awaited as before_commit(txn, result) inside the transaction, just before it
    # commits (the replication server records its at-most-once reply there)
    before_commit: Callable[[Any, Any], Any] | None = None


class Part:
    """One group's share of a distributed operation: a prepared (or committed)
    transaction and the allocations that follow its fate."""

    def __init__(self, fs: "FileSystem", txn, op: Op | None, results: list):
        self.fs = fs
        self.txn = txn
        self.op = op
        self.results = results

    async def commit(self):
        """Commit the prepared transaction (forced); returns its CommitRecord. Shielded:
        a caller cancelled meanwhile (its connection broke) still leaves it committed
        and its allocations settled."""
        with trio.CancelScope(shield=True):
            rec = await self.txn.commit()
        if self.op is not None:
            self.op.committed()
        else:           # recovered in doubt: which inodes it wrote is not known here
            self.fs._committed_inodes.clear()
        return rec

    async def abort(self) -> None:
        await self.txn.abort()
        if self.op is not None:
            self.op.aborted()


current_request: ContextVar[Request | None] = ContextVar("replfs_fs_request", default=None)


def _now() -> int:
    return time.time_ns()


def _type_of(mode: int) -> int:
    return (mode & S_IFMT) >> 12


def _check_linkable(node: Inode) -> None:
    """May `node` get one more name (link)?"""
    if node.is_dir:
        raise FsError(errno.EPERM, "hard links to directories are not allowed")
    if node.nlink == 0:
        raise FsError(errno.ENOENT, "the file was removed")
    if node.nlink >= LINK_MAX:
        raise FsError(errno.EMLINK, "too many links")


class FileSystem:
    """One replica group's filesystem over a transaction manager. Build it with
    `await FileSystem.open(device, mgr_factory)` (see fs/mount.py)."""

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
        if ino in self._held_numbers:
            self._held_numbers.discard(ino)
            self.imap.commit_freed([ino_slot(ino)])

    def inodes_committed(self, nodes: dict[int, Inode]) -> None:
        """Called after a transaction committed, with the inodes it wrote."""
        cache = self._committed_inodes
        for ino, node in nodes.items():
            if node.mode == 0:
                cache.pop(ino, None)
            else:
                cache[ino] = node
        if len(cache) > 65536:
            for ino in list(cache)[:16384]:
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

    # ---------------------------------------------------------------- helpers
    async def _dir(self, op: Op, ino: int, mode: str) -> Inode:
        node = await op.inode(ino, mode)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        if node.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {ino} was removed")
        return node

    async def _new(self, op: Op, parent: int, pnode: Inode, name: bytes, mode: int,
                   uid: int, gid: int, rdev: int = 0) -> tuple[int, Inode]:
        directory.check_name(name)
        if await directory.lookup(op, pnode, name) is not None:
            raise FsError(errno.EEXIST, name.decode(errors="replace"))
        now = _now()
        if pnode.mode & stat.S_ISGID:
            gid = pnode.gid
            if mode & S_IFMT == S_IFDIR:
                mode |= stat.S_ISGID
        node = Inode(mode=mode, uid=uid, gid=gid, nlink=1, rdev=rdev,
                     atime_ns=now, mtime_ns=now, ctime_ns=now)
        ino = await op.new_inode(node, near=parent)
        await directory.insert(op, pnode, name, ino, _type_of(mode))
        pnode.mtime_ns = pnode.ctime_ns = now
        return ino, node

    async def _named_child(self, op: Op, parent: int, name: bytes) -> tuple[Inode, int, Inode]:
        """X-lock directory `parent` and the inode that `name` names in it; ENOENT if
        there is none. Returns (parent inode, child ino, child inode)."""
        pnode = await self._dir(op, parent, "X")
        ent = await directory.lookup(op, pnode, name)
        if ent is None:
            raise FsError(errno.ENOENT, name.decode(errors="replace"))
        return pnode, ent[0], await op.inode(ent[0], "X")

    async def _drop_link(self, op: Op, ino: int, node: Inode) -> None:
        """One name of `ino` is gone: at zero links it becomes an orphan, freed when the
        last reference is forgotten (or at the next mount)."""
        node.nlink = 0 if node.is_dir else node.nlink - 1
        node.ctime_ns = _now()
        if node.nlink == 0:
            onode = await op.inode(self.orphan_ino, "X")
            key = b"%016x" % ino
            if await directory.lookup(op, onode, key) is None:
                await directory.insert(op, onode, key, ino, _type_of(node.mode))
            await op.put(self.orphan_ino, onode)
        await op.put(ino, node)

    async def _free(self, op: Op, ino: int, node: Inode, hold: bool = False) -> None:
        await blockmap.truncate(op, node, 0)
        if node.xattr_block:
            await op.free_block(node.xattr_block)
        await op.free_inode(ino, hold=hold)

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

    # ---------------------------------------------------------------- creation
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        if mode & S_IFMT == 0:
            mode |= S_IFREG
        if mode & S_IFMT in (S_IFDIR, S_IFLNK):
            raise FsError(errno.EINVAL, "use mkdir/symlink")

        async def fn(op):
            pnode = await self._dir(op, parent, "X")
            ino, node = await self._new(op, parent, pnode, name, mode, uid, gid, rdev)
            await op.put(parent, pnode)
            return Attr.of(ino, node)
        return await self._run("mknod", fn)

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return await self.mknod(parent, name, (mode & 0o7777) | S_IFREG, 0, uid, gid)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        async def fn(op):
            pnode = await self._dir(op, parent, "X")
            if pnode.nlink >= LINK_MAX:
                raise FsError(errno.EMLINK, "too many subdirectories")
            ino, node = await self._new(op, parent, pnode, name, (mode & 0o7777) | S_IFDIR, uid, gid)
            node.nlink = 2
            node.parent = parent
            await directory.init(op, node)
            await op.put(ino, node)
            pnode.nlink += 1
            await op.put(parent, pnode)
            return Attr.of(ino, node)
        return await self._run("mkdir", fn)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if len(target) > SYMLINK_MAX:
            raise FsError(errno.ENAMETOOLONG, f"symlink target of {len(target)} bytes")
        if not target:
            raise FsError(errno.ENOENT, "empty symlink target")

        async def fn(op):
            pnode = await self._dir(op, parent, "X")
            ino, node = await self._new(op, parent, pnode, name, S_IFLNK | 0o777, uid, gid)
            node.size = len(target)
            if len(target) <= INLINE_MAX:
                node.inline, node.inline_len = target, len(target)
            else:
                blk, _ = await blockmap.ensure(op, node, 0)
                await op.write_block(blk, 0, target.ljust(BLOCK_SIZE, b"\0"), undo=False)
            await op.put(ino, node)
            await op.put(parent, pnode)
            return Attr.of(ino, node)
        return await self._run("symlink", fn)

    async def readlink(self, ino: int) -> bytes:
        async def fn(op):
            node = await op.inode(ino, "S")
            if not node.is_lnk:
                raise FsError(errno.EINVAL, "not a symlink")
            if node.inline_len:
                return node.inline
            blk = await blockmap.lookup(op, node, 0)
            return bytes((await op.read_block(blk))[:node.size])
        return await self._run("readlink", fn, readonly=True)

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        async def fn(op):
            pnode = await self._dir(op, parent, "X")
            node = await op.inode(ino, "X")
            _check_linkable(node)
            directory.check_name(name)
            if await directory.lookup(op, pnode, name) is not None:
                raise FsError(errno.EEXIST, name.decode(errors="replace"))
            await directory.insert(op, pnode, name, ino, _type_of(node.mode))
            now = _now()
            node.nlink += 1
            node.ctime_ns = now
            pnode.mtime_ns = pnode.ctime_ns = now
            await op.put(ino, node)
            await op.put(parent, pnode)
            return Attr.of(ino, node)
        return await self._run("link", fn)

    # ---------------------------------------------------------------- removal
    async def unlink(self, parent: int, name: bytes, keep=None) -> int | None:
        """Remove `name`. When it was the inode's last name it becomes an orphan, freed
        at `forget` -- unless the caller says which inodes it still holds open (`keep`)
        and this one is not among them: then it is freed in the same transaction and
        its number returned. The number is held until the caller's `release_number`
        (instead of `forget`), when its kernel has forgotten the inode."""
        keep = None if keep is None else set(keep)

        async def fn(op):
            pnode, ino, node = await self._named_child(op, parent, name)
            if node.is_dir:
                raise FsError(errno.EISDIR, "use rmdir for directories")
            await directory.remove(op, pnode, name)
            crash_point("fs.unlink.removed")
            pnode.mtime_ns = pnode.ctime_ns = _now()
            await op.put(parent, pnode)
            if node.nlink == 1 and keep is not None and ino not in keep:
                await self._free(op, ino, node, hold=True)
                return ino
            await self._drop_link(op, ino, node)
            return None
        return await self._run("unlink", fn)

    async def rmdir(self, parent: int, name: bytes) -> None:
        if name == b".":
            raise FsError(errno.EINVAL, "cannot remove '.'")
        if name == b"..":
            raise FsError(errno.ENOTEMPTY, "cannot remove '..'")

        async def fn(op):
            pnode, ino, node = await self._named_child(op, parent, name)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR, name.decode(errors="replace"))
            if node.dir_entries:
                raise FsError(errno.ENOTEMPTY, name.decode(errors="replace"))
            await directory.remove(op, pnode, name)
            pnode.nlink -= 1
            pnode.mtime_ns = pnode.ctime_ns = _now()
            await op.put(parent, pnode)
            await self._drop_link(op, ino, node)
        await self._run("rmdir", fn)

    async def forget(self, ino: int) -> None:
        """No reference to `ino` remains (kernel lookups, open files): free it if it
        has no links left."""
        async def fn(op):
            node = await op.inode(ino, "X", must_exist=False)
            if node.nlink != 0 or node.mode == 0:
                return False
            onode = await op.inode(self.orphan_ino, "X")
            key = b"%016x" % ino
            if await directory.lookup(op, onode, key) is not None:
                await directory.remove(op, onode, key)
                await op.put(self.orphan_ino, onode)
            await self._free(op, ino, node)
            return True
        return await self._run("forget", fn)

    async def reclaim_orphans(self) -> int:
        """Free every orphan (after a crash or at mount nobody references them)."""
        async def list_fn(op):
            onode = await self._dir(op, self.orphan_ino, "S")
            return [e[1] for e in await directory.all_entries(op, onode)]
        n = 0
        for ino in await self._run("orphans", list_fn, readonly=True):
            n += bool(await self.forget(ino))
        return n

    # ---------------------------------------------------------------- rename
    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        directory.check_name(n_new)

        async def fn(op):
            for d in sorted({p_old, p_new}):       # a fixed order makes deadlocks rarer
                await self._dir(op, d, "X")
            pold = await op.inode(p_old, "X")
            pnew = await op.inode(p_new, "X")
            src = await directory.lookup(op, pold, n_old)
            if src is None:
                raise FsError(errno.ENOENT, n_old.decode(errors="replace"))
            dst = await directory.lookup(op, pnew, n_new)
            sino = src[0]
            snode = await op.inode(sino, "X")
            dnode = await op.inode(dst[0], "X") if dst else None
            now = _now()
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise FsError(errno.ENOENT, n_new.decode(errors="replace"))
                if sino == dst[0]:
                    return
                if p_old != p_new:
                    if snode.is_dir:
                        await self._check_not_ancestor(op, sino, p_new)
                    if dnode.is_dir:
                        await self._check_not_ancestor(op, dst[0], p_old)
                await directory.replace(op, pold, n_old, dst[0], _type_of(dnode.mode))
                await directory.replace(op, pnew, n_new, sino, _type_of(snode.mode))
                if p_old != p_new:
                    if snode.is_dir:
                        snode.parent = p_new
                        pold.nlink -= 1
                        pnew.nlink += 1
                    if dnode.is_dir:
                        dnode.parent = p_old
                        pnew.nlink -= 1
                        pold.nlink += 1
                snode.ctime_ns = dnode.ctime_ns = now
                await op.put(dst[0], dnode)
            else:
                if dst is not None:
                    if flags & RENAME_NOREPLACE:
                        raise FsError(errno.EEXIST, n_new.decode(errors="replace"))
                    if dst[0] == sino:
                        return          # both names are links to one file: nothing to do
                    if snode.is_dir and not dnode.is_dir:
                        raise FsError(errno.ENOTDIR, n_new.decode(errors="replace"))
                    if not snode.is_dir and dnode.is_dir:
                        raise FsError(errno.EISDIR, n_new.decode(errors="replace"))
                    if dnode.is_dir and dnode.dir_entries:
                        raise FsError(errno.ENOTEMPTY, n_new.decode(errors="replace"))
                if snode.is_dir and p_old != p_new:
                    await self._check_not_ancestor(op, sino, p_new)
                if dst is not None:
                    await directory.replace(op, pnew, n_new, sino, _type_of(snode.mode))
                    if dnode.is_dir:
                        pnew.nlink -= 1
                    await self._drop_link(op, dst[0], dnode)
                else:
                    if snode.is_dir and p_old != p_new and pnew.nlink >= LINK_MAX:
                        raise FsError(errno.EMLINK, "too many subdirectories")
                    await directory.insert(op, pnew, n_new, sino, _type_of(snode.mode))
                crash_point("fs.rename.inserted")
                await directory.remove(op, pold, n_old)
                if snode.is_dir and p_old != p_new:
                    snode.parent = p_new
                    pold.nlink -= 1
                    pnew.nlink += 1
                snode.ctime_ns = now
            await op.put(sino, snode)
            pold.mtime_ns = pold.ctime_ns = now
            pnew.mtime_ns = pnew.ctime_ns = now
            await op.put(p_old, pold)
            if p_new != p_old:
                await op.put(p_new, pnew)
        await self._run("rename", fn)

    async def _check_not_ancestor(self, op: Op, ino: int, start: int) -> None:
        """EINVAL if directory `ino` is `start` or one of its ancestors."""
        cur = start
        seen = 0
        while True:
            if cur == ino:
                raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
            if cur == self.root_ino:
                return
            node = await op.inode(cur, "S")
            cur = node.parent
            seen += 1
            if cur == 0 or seen > 100000:
                raise FsError(errno.EIO, "directory parent chain is broken (run fsck)")

    # ---------------------------------------------------------------- data
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

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        if offset < 0:
            raise FsError(errno.EINVAL, "negative offset")
        if offset + len(data) > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"write beyond the largest file size ({MAX_FILE_SIZE} bytes)")
        if not data:
            return 0

        async def fn(op):
            node = await op.inode(ino, "X")
            if node.is_dir:
                raise FsError(errno.EISDIR, "is a directory")
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
            return len(data)
        return await self._run("write", fn)

    async def fsync(self, ino: int | None = None) -> None:
        """Return when every committed operation so far is on stable storage. Raises
        FsError(EIO) (and enters failsafe mode) if the log cannot be written."""
        try:
            await self.mgr.force()
        except (TxnManagerFailed, OSError) as exc:
            self._enter_failsafe(exc)
            raise FsError(errno.EIO, f"the log cannot be written: {exc}") from None

    def _enter_failsafe(self, exc: BaseException) -> None:
        if not self.failsafe:
            self.failsafe = str(exc)
            log.error("filesystem enters failsafe mode (writes refused, reads served): %s", exc)

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
                    out.append((name, cino, nxt))   # the caller asks the inode's group
                    continue
                cnode = committed.get(cino)
                if cnode is None:
                    cnode = await op.inode(cino, "S")
                out.append((name, Attr.of(cino, cnode), nxt))
            return out
        return await self._run("readdir", fn, readonly=True)

    async def statfs(self) -> dict:
        sb = self.sb
        return dict(bsize=BLOCK_SIZE, frsize=BLOCK_SIZE, blocks=sb.nblocks - sb.data_start,
                    bfree=self.bmap.nfree, bavail=self.bmap.nfree, files=sb.ninodes - 3,
                    ffree=self.imap.nfree, favail=self.imap.nfree, namemax=NAME_MAX)

    # ---------------------------------------------------------------- xattrs
    # replfs has no POSIX ACLs: like a filesystem mounted without them, it refuses their
    # xattr names with EOPNOTSUPP, so cp -a, mv, rsync -A and tar --acls fall back to
    # chmod and the mode is the only permission (docs/architecture.md, "ACLs"). Stored
    # as plain xattrs they would change nothing and leave the mode where cp's creat put it.
    ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})

    @classmethod
    def refuse_acl(cls, name: bytes) -> None:
        """Raise FsError(EOPNOTSUPP) if `name` is a POSIX ACL's xattr name."""
        if name in cls.ACL_XATTRS:
            raise FsError(errno.EOPNOTSUPP, f"{name.decode()}: replfs has no POSIX ACLs")

    async def _xattrs(self, op: Op, node: Inode) -> dict:
        if not node.xattr_block:
            return {}
        data = await op.read_block(node.xattr_block)
        n = int.from_bytes(data[:4], "little")
        return msgpack.unpackb(data[4:4 + n]) if n else {}

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        self.refuse_acl(name)

        async def fn(op):
            node = await op.inode(ino, "S")
            val = (await self._xattrs(op, node)).get(name)
            if val is None:
                raise FsError(errno.ENODATA, name.decode(errors="replace"))
            return val
        return await self._run("getxattr", fn, readonly=True)

    async def listxattr(self, ino: int) -> list[bytes]:
        async def fn(op):
            # an ACL stored by a replfs older than the refusal stays hidden
            xs = await self._xattrs(op, await op.inode(ino, "S"))
            return [n for n in xs if n not in self.ACL_XATTRS]
        return await self._run("listxattr", fn, readonly=True)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if len(name) > XATTR_NAME_MAX or not name:
            raise FsError(errno.ERANGE, "xattr name length")
        if len(value) > XATTR_VALUE_MAX:
            raise FsError(errno.E2BIG, f"xattr value of {len(value)} bytes (at most {XATTR_VALUE_MAX})")
        self.refuse_acl(name)

        async def fn(op):
            node = await op.inode(ino, "X")
            xs = await self._xattrs(op, node)
            if flags & XATTR_CREATE and name in xs:
                raise FsError(errno.EEXIST, name.decode(errors="replace"))
            if flags & XATTR_REPLACE and name not in xs:
                raise FsError(errno.ENODATA, name.decode(errors="replace"))
            xs[name] = value
            await self._put_xattrs(op, ino, node, xs)
        await self._run("setxattr", fn)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self.refuse_acl(name)

        async def fn(op):
            node = await op.inode(ino, "X")
            xs = await self._xattrs(op, node)
            if name not in xs:
                raise FsError(errno.ENODATA, name.decode(errors="replace"))
            del xs[name]
            await self._put_xattrs(op, ino, node, xs)
        await self._run("removexattr", fn)

    async def _put_xattrs(self, op: Op, ino: int, node: Inode, xs: dict) -> None:
        packed = msgpack.packb(xs) if xs else b""
        if len(packed) + 4 > BLOCK_SIZE:
            raise FsError(errno.ENOSPC, "no room for more extended attributes on this file")
        if not xs:
            if node.xattr_block:
                await op.free_block(node.xattr_block)
                node.xattr_block = 0
        else:
            fresh = False
            if not node.xattr_block:
                node.xattr_block = await op.new_block(zero=False)
                fresh = True
            body = (len(packed).to_bytes(4, "little") + packed).ljust(BLOCK_SIZE, b"\0")
            await op.write_block(node.xattr_block, 0, body, undo=not fresh)
        node.ctime_ns = _now()
        await op.put(ino, node)

    # ---------------------------------------------------------------- distributed parts
    # An operation that spans replica groups (replication/twopc.py) is planned from
    # unlocked reads (`entry`, `dir_info`) and then runs as one *part* per group: a list
    # of steps on that group's own objects, in one transaction, under strict 2PL. Each
    # step re-checks what the plan assumed and raises `Stale` if it changed (the
    # coordinator plans again) or FsError for a real error (the operation fails).

    async def entry(self, parent: int, name: bytes) -> list | None:
        """[ino, type] that `name` names in directory `parent` (no lock kept), or None."""
        async def fn(op):
            pnode = await self._dir(op, parent, "S")
            if len(name) > NAME_MAX:
                raise FsError(errno.ENAMETOOLONG, "name too long")
            ent = await directory.lookup(op, pnode, name)
            return None if ent is None else [ent[0], ent[1]]
        return await self._run("entry", fn, readonly=True)

    async def dir_info(self, ino: int) -> dict:
        """A directory's parent, entry count, link count, mode and group id."""
        async def fn(op):
            node = await self._dir(op, ino, "S")
            return dict(parent=node.parent or ino, entries=node.dir_entries, nlink=node.nlink,
                        mode=node.mode, gid=node.gid)
        return await self._run("dir_info", fn, readonly=True)

    async def run_part(self, steps: list, finish, *, lock_timeout: float | None = None,
                       name: str = "part") -> "Part":
        """Run `steps` (see `_step`) in one transaction, then `await finish(txn, results)`
        instead of committing (it prepares the transaction, or commits it). One attempt:
        a deadlock or lock timeout raises the txn layer's `Retryable`, for the caller to
        abort the whole distributed operation and retry it. Returns a `Part`."""
        if self.failsafe:
            raise FsError(errno.EROFS, f"filesystem in failsafe mode: {self.failsafe}")
        box: list = []

        async def attempt(txn):
            op = Op(self, txn)
            op.lock_timeout = lock_timeout
            box.append(op)
            results = [await self._step(op, st) for st in steps]
            await finish(txn, results)
            return results

        try:
            results = await self.mgr.run(attempt, name=name, retries=0)
        except BaseException:
            if box:
                box[-1].aborted()
            raise
        op = box[-1]
        part = Part(self, op.txn, op, results)
        if op.txn.state == "committed":
            op.committed()
        return part

    def resume_part(self, txn) -> "Part":
        """A transaction recovered in doubt (its Op is gone): it can still be decided."""
        return Part(self, txn, None, [])

    STEPS = frozenset({"unlink_entry", "link_entry", "move_child", "drop_link", "add_link",
                       "new_dir", "expect_parent"})

    async def _step(self, op: Op, st: list):
        if not st or st[0] not in self.STEPS:
            raise FsError(errno.EINVAL, f"unknown step {st[:1]!r}")
        return await getattr(self, "_step_" + st[0])(op, _now(), *st[1:])

    async def _named(self, op: Op, d: int, name: bytes, expect: int) -> Inode:
        """X-lock directory `d`; Stale unless `name` names `expect` there (0: no entry)."""
        pnode = await self._dir(op, d, "X")
        ent = await directory.lookup(op, pnode, name)
        if (ent[0] if ent else 0) != expect:
            raise Stale(f"{name!r} in {d:#x} changed")
        return pnode

    async def _dir_changed(self, op: Op, d: int, pnode: Inode, nlink_delta: int, now: int) -> None:
        pnode.nlink += nlink_delta
        pnode.mtime_ns = pnode.ctime_ns = now
        await op.put(d, pnode)

    async def _step_unlink_entry(self, op, now, d, name, expect, nlink_delta):
        pnode = await self._named(op, d, name, expect)
        await directory.remove(op, pnode, name)
        await self._dir_changed(op, d, pnode, nlink_delta, now)

    async def _step_link_entry(self, op, now, d, name, ino, typ, replaced, nlink_delta):
        """Name `ino` in `d`, where `name` names `replaced` now (0: nothing)."""
        directory.check_name(name)
        pnode = await self._named(op, d, name, replaced)
        if nlink_delta > 0 and pnode.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK, "too many subdirectories")
        if replaced:
            await directory.replace(op, pnode, name, ino, typ)
        else:
            await directory.insert(op, pnode, name, ino, typ)
        await self._dir_changed(op, d, pnode, nlink_delta, now)

    async def _step_move_child(self, op, now, ino, is_dir, old_parent, new_parent):
        """`ino` got a new name; a directory's `..` goes to `new_parent` (0: unchanged)."""
        node = await op.inode(ino, "X")
        if node.nlink == 0 or node.is_dir != is_dir:
            raise Stale(f"inode {ino:#x} changed")
        if new_parent:
            if node.parent != old_parent:
                raise Stale(f"directory {ino:#x} moved")
            node.parent = new_parent
        node.ctime_ns = now
        await op.put(ino, node)

    async def _step_drop_link(self, op, now, ino, is_dir):
        node = await op.inode(ino, "X")
        if node.nlink == 0 or node.is_dir != is_dir:
            raise Stale(f"inode {ino:#x} changed")
        if node.is_dir and node.dir_entries:
            raise FsError(errno.ENOTEMPTY, f"directory {ino:#x} is not empty")
        await self._drop_link(op, ino, node)

    async def _step_add_link(self, op, now, ino):
        node = await op.inode(ino, "X")
        _check_linkable(node)
        node.nlink += 1
        node.ctime_ns = now
        await op.put(ino, node)
        return Attr.of(ino, node)

    async def _step_new_dir(self, op, now, parent, mode, uid, gid):
        """A directory here whose parent is in another group."""
        node = Inode(mode=(mode & 0o7777) | S_IFDIR, uid=uid, gid=gid, nlink=2,
                     atime_ns=now, mtime_ns=now, ctime_ns=now, parent=parent)
        ino = await op.new_inode(node)
        await directory.init(op, node)
        await op.put(ino, node)
        return Attr.of(ino, node)

    async def _step_expect_parent(self, op, now, d, parent):
        node = await self._dir(op, d, "S")
        if (node.parent or d) != parent:
            raise Stale(f"directory {d:#x} moved")

    async def close(self) -> None:
        """Checkpoint and close the transaction manager (the device stays open)."""
        await self.mgr.close()
