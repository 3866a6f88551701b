"""Extended attributes of `FileSystem`: get, list, set and remove, stored msgpacked in
one block per inode, and the refusal of POSIX ACLs' names.

`XattrOps` is a mixin of `FileSystem` (fs/core.py): it shares its state and uses its
`_run`.
"""

from __future__ import annotations

import errno

import msgpack

from replfs.fs.errors import FsError
from replfs.fs.layout import BLOCK_SIZE, XATTR_NAME_MAX, Inode
from replfs.fs.op import Op
from replfs.fs.values import _now

XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_VALUE_MAX = 3500


class XattrOps:
    """The xattr operations of `FileSystem` (a mixin)."""

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
