"""Distributed parts: one replica group's share of an operation that spans groups.

An operation that spans replica groups (replication/twopc.py) is planned from unlocked
reads (`entry`, `dir_info`) and then runs as one *part* per group: a list of steps on
that group's own objects, in one transaction, under strict 2PL. Each step re-checks what
the plan assumed and raises `Stale` if it changed (the coordinator plans again) or
FsError for a real error (the operation fails). `PartOps` is a mixin of `FileSystem`
(fs/core.py); `Part` is what `run_part` returns.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import trio

from replfs.fs import directory
from replfs.fs.errors import FsError, Stale
from replfs.fs.layout import NAME_MAX, S_IFDIR, Inode
from replfs.fs.namespace import LINK_MAX, _check_linkable
from replfs.fs.op import Op
from replfs.fs.values import Attr, _now

if TYPE_CHECKING:
    from replfs.fs.core import FileSystem


class Part:
    """One group's share of a distributed operation: a prepared (or committed)
    transaction and the allocations that follow its fate."""

    def __init__(self, fs: "FileSystem", txn, op: Op | None, results: list):
        self.fs = fs
        self.txn = txn
        self.op = op
        self.results = results

    async def commit(self):
        """Commit the prepared transaction (forced); returns its CommitRecord. Its locks
        go as soon as the COMMIT is appended (the next operation on what it changed
        need not wait for this force). Shielded: a caller cancelled meanwhile (its
        connection broke) still leaves it committed and its allocations settled."""
        with trio.CancelScope(shield=True):
            rec = await self.txn.commit(release_early=True)
        if self.op is not None:
            self.op.committed()
        else:           # recovered in doubt: which inodes it wrote is not known here
            self.fs._committed_inodes.clear()
        return rec

    async def abort(self) -> None:
        await self.txn.abort()
        if self.op is not None:
            self.op.aborted()


class PartOps:
    """The distributed-part operations of `FileSystem` (a mixin: it uses the
    filesystem's `_run`, `_dir`, `_drop_link`, `mgr` and `failsafe`)."""

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
        elif op.txn.state == "prepared":
            # its inodes' committed state is about to change at the coordinator's word:
            # no answer from the committed-inode cache until then (getattr takes their
            # S lock instead, and waits for the decision)
            op.uncache_written()
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
