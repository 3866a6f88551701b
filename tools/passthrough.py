"""A minimal pyfuse3 passthrough filesystem: the floor any Python FUSE filesystem pays.

`python -m replfs.tools.passthrough SRC MNT` mirrors directory SRC at MNT, with the same
mount options, read-ahead window and kernel cache timeouts as replfs, so that
`replfs bench fs` can measure replfs against it on the same disk in the same run. Only
what the benchmark uses is implemented (lookup, getattr, setattr, create, mkdir, unlink,
rmdir, rename, open, read, write, fsync, opendir, readdir, statfs, forget).
"""

from __future__ import annotations

import errno
import os
import sys
from collections import defaultdict

import pyfuse3
import trio

from replfs.fs.fuse_ops import ATTR_TIMEOUT, ENTRY_TIMEOUT
from replfs.tools.mount_cmd import set_readahead


def _entry(st: os.stat_result) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    for a in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
              "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        setattr(e, a, getattr(st, a))
    e.st_blksize = st.st_blksize
    e.st_blocks = st.st_blocks
    e.generation = 0
    e.attr_timeout = ATTR_TIMEOUT
    e.entry_timeout = ENTRY_TIMEOUT
    return e


def _oserr(fn):
    async def wrapper(*args, **kw):
        try:
            return await fn(*args, **kw)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    wrapper.__name__ = fn.__name__
    return wrapper


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, src: str):
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: src}
        self.lookups: dict[int, int] = defaultdict(int)
        self.fds: dict[int, int] = {}

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _remember(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        ino = st.st_ino if path != self.paths[pyfuse3.ROOT_INODE] else pyfuse3.ROOT_INODE
        self.paths[ino] = path
        self.lookups[ino] += 1
        e = _entry(st)
        e.st_ino = ino
        return e

    @_oserr
    async def lookup(self, parent_inode, name, ctx=None):
        return self._remember(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.lookups[ino] -= n
            if self.lookups[ino] <= 0 and ino != pyfuse3.ROOT_INODE:
                self.lookups.pop(ino, None)
                self.paths.pop(ino, None)

    @_oserr
    async def getattr(self, inode, ctx=None):
        e = _entry(os.lstat(self._path(inode)))
        e.st_ino = inode
        return e

    @_oserr
    async def setattr(self, inode, attr, fields, fh, ctx):
        p = self._path(inode)
        if fields.update_size:
            os.truncate(p, attr.st_size)
        if fields.update_mode:
            os.chmod(p, attr.st_mode & 0o7777)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(p)
            os.utime(p, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                            attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return await self.getattr(inode)

    @_oserr
    async def create(self, parent_inode, name, mode, flags, ctx):
        p = os.path.join(self._path(parent_inode), os.fsdecode(name))
        fd = os.open(p, flags | os.O_CREAT | os.O_TRUNC, mode)
        e = self._remember(p)
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd), e

    @_oserr
    async def mkdir(self, parent_inode, name, mode, ctx):
        p = os.path.join(self._path(parent_inode), os.fsdecode(name))
        os.mkdir(p, mode)
        return self._remember(p)

    @_oserr
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    @_oserr
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    @_oserr
    async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):
        old = os.path.join(self._path(p_old), os.fsdecode(n_old))
        new = os.path.join(self._path(p_new), os.fsdecode(n_new))
        os.rename(old, new)
        ino = os.lstat(new).st_ino
        if ino in self.paths:
            self.paths[ino] = new

    @_oserr
    async def open(self, inode, flags, ctx):
        fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        return pyfuse3.FileInfo(fh=fd)

    @_oserr
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @_oserr
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    @_oserr
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fsync, fh)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(fh)

    @_oserr
    async def opendir(self, inode, ctx):
        return inode

    @_oserr
    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        entries = sorted(os.scandir(path), key=lambda d: d.inode())
        for de in entries:
            if de.inode() <= start_id:
                continue
            st = de.stat(follow_symlinks=False)
            if not pyfuse3.readdir_reply(token, os.fsencode(de.name), _entry(st), de.inode()):
                return
            self.paths[st.st_ino] = de.path
            self.lookups[st.st_ino] += 1

    async def releasedir(self, fh):
        pass

    @_oserr
    async def statfs(self, ctx):
        s = os.statvfs(self._path(pyfuse3.ROOT_INODE))
        out = pyfuse3.StatvfsData()
        for a in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(out, a, getattr(s, a))
        return out


def main(argv=None) -> None:
    src, mnt = (argv or sys.argv[1:])[:2]
    ops = Passthrough(os.path.realpath(src))
    pyfuse3.init(ops, mnt, set(pyfuse3.default_options) | {"fsname=passthrough"})

    async def serve():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(set_readahead, mnt)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
