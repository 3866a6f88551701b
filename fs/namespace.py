"""Namespace operations of `FileSystem`: creating names (mknod, create, mkdir, symlink,
link), reading a symlink, removing names (unlink, rmdir), orphans (an inode with no name
left, freed at `forget` or the next mount) and rename within one replica group.

`NamespaceOps` is a mixin of `FileSystem` (fs/core.py): it shares its state and uses its
`_run` and `_dir`.
"""

from __future__ import annotations

import errno
import stat

from replfs.crash import crash_point
from replfs.fs import blockmap, directory
from replfs.fs.errors import FsError
from replfs.fs.layout import (BLOCK_SIZE, INLINE_MAX, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG,
                              SYMLINK_MAX, Inode)
from replfs.fs.op import Op
from replfs.fs.values import Attr, _now, _type_of

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
LINK_MAX = 65000


def _check_linkable(node: Inode) -> None:
    """May `node` get one more name (link)?"""
    if node.is_dir:
        raise FsError(errno.EPERM, "hard links to directories are not allowed")
    if node.nlink == 0:
        raise FsError(errno.ENOENT, "the file was removed")
    if node.nlink >= LINK_MAX:
        raise FsError(errno.EMLINK, "too many links")


class NamespaceOps:
    """The name operations of `FileSystem` (a mixin)."""

    # ---------------------------------------------------------------- helpers
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
        has no links left. Most forgets are of files that keep their links: a read
        tells, and only an unlinked one costs an update (a commit, replicated)."""
        async def unlinked(op):
            node = await op.inode(ino, "S", must_exist=False)
            return node.nlink == 0 and node.mode != 0
        if not await self._run("forget?", unlinked, readonly=True):
            return False

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
