"""The pyfuse3 `Operations` adapter: thin handlers that translate between the kernel's
requests and the filesystem state machine (`FileSystem` in process, or anything with the
same methods -- the replication client later).

Every handler catches the core's `FsError` and raises `pyfuse3.FUSEError(errno)`; any
other exception is logged and becomes EIO, because pyfuse3 ends the mount on anything
else.

Lookup counts follow pyfuse3's contract (developer-notes/lookup_counts.rst): +1 for each
successful lookup, create, mknod, mkdir, symlink, link, and each readdir entry for which
`readdir_reply` returned True; `forget` subtracts. An inode whose lookup count and open
handles both reach zero is handed to `fs.forget`, which frees it if it has no links
(an unlinked file that is still open lives until then).

An inode number must not be reused while a reply naming the old inode may still reach
the kernel: it would find its new inode under that number with another generation and
mark it bad (EIO for whoever has it open). So a request that names existing inodes
(lookup, link, readdir) is a "namer" from its call into the filesystem until its
entries are counted; a forget decided while namers run waits for them to finish, and
then frees only what they did not name again. Readdir entries that the kernel had no
room for stay counted (pinned) in the listing until they are sent or dropped.

The kernel's page cache is kept across opens with close-to-open consistency, as NFS
does: every open asks the filesystem for the file's attributes (in a cluster, the
primary: a real request), and lets the kernel keep the pages it holds only if the file's
stamp (generation, mtime, ctime, size) is the one this mount saw at its previous open of
it -- that is, nothing changed it since, here or on another mount. Otherwise the kernel
drops its pages and its cached attributes (the size, which bounds a read, may have
changed). Writes through this mount change the stamp too, so the open after them drops
the pages they left: the kernel (auto_inval_data) drops those anyway once it sees the
new mtime.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter

import pyfuse3

from replfs.fs.core import FileSystem
from replfs.fs.errors import FsError
from replfs.raid.blockdev import BlockIOError

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 5.0
ENTRY_TIMEOUT = 5.0


# (SetattrFields flag, FileSystem.setattr keyword, EntryAttributes field); pyfuse3 has
# already turned UTIME_NOW into the current time.
SETATTR_FIELDS = [
    ("update_mode", "mode", "st_mode"),
    ("update_uid", "uid", "st_uid"),
    ("update_gid", "gid", "st_gid"),
    ("update_size", "size", "st_size"),
    ("update_atime", "atime_ns", "st_atime_ns"),
    ("update_mtime", "mtime_ns", "st_mtime_ns"),
]


def entry(attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = attr.generation
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = 4096
    e.st_blocks = attr.blocks
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    e.attr_timeout = ATTR_TIMEOUT
    e.entry_timeout = ENTRY_TIMEOUT
    return e


def translate(fn):
    """Map the core's errors to FUSEError; nothing else may leave a handler."""
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except BlockIOError as exc:
            log.error("%s: I/O error: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    wrapper.__name__ = fn.__name__
    return wrapper


class _Listing:
    """An open directory: its attributes (for ".") and the entries of the last batch
    that the kernel had no room for, with the offset they start at (their inodes are
    counted as looked up while kept here)."""

    def __init__(self, attr):
        self.attr = attr
        self._start: int | None = None
        self._rest: list = []

    def keep(self, start: int, rest: list) -> list:
        """Keep `rest`; returns what was kept before (to be uncounted)."""
        old, self._start, self._rest = self._rest, start, rest
        return old

    def take(self, start: int) -> tuple[list | None, list]:
        """(the kept entries if they start at `start` -- a sequential listing -- else
        None; the kept entries dropped instead, to be uncounted)."""
        kept_at, rest = self._start, self._rest
        self._start, self._rest = None, []
        return (rest, []) if kept_at == start else (None, rest)

    def drop(self) -> list:
        rest, self._start, self._rest = self._rest, None, []
        return rest


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    # The kernel's pages of a file stay valid until an open finds that the file changed
    # (close-to-open: `_keep_cache`), not whenever it sees a new mtime: this mount's own
    # writes then leave the file readable from the page cache. (Heeded by the pyfuse3
    # that tools/bootstrap.sh patches; an unpatched one keeps the kernel's default.)
    enable_auto_inval_data = False

    def __init__(self, fs):
        super().__init__()
        self.fs = fs
        self.lookups: Counter[int] = Counter()
        self.opens: Counter[int] = Counter()
        self._handles: dict[int, int] = {}
        self._next_fh = 1
        # ino -> the stamp its latest open found: the kernel's pages of it are of that
        # version (or a later one, which the next open's stamp then tells apart)
        self._stamps: dict[int, tuple] = {}
        # inodes an unlink freed at once (nobody here held them open): their numbers
        # stay held (not reused) until the kernel forgets them, then are released
        self._freed: set[int] = set()
        self._listings: dict[int, _Listing] = {}     # directory handle -> its listing
        self._namer_seq = 0
        self._namers: set[int] = set()      # namers running (see the module doc)
        self._deferred: list[tuple[int, int]] = []  # (newest namer then running, ino)

    # ------------------------------------------------------------ references
    def _looked_up(self, attr):
        self.lookups[attr.ino] += 1
        return entry(attr)

    def _naming(self) -> int:
        self._namer_seq += 1
        self._namers.add(self._namer_seq)
        return self._namer_seq

    async def _named(self, nid: int) -> None:
        """Namer `nid` has counted its entries: forgets that waited for it may go."""
        self._namers.discard(nid)
        if not self._deferred:
            return
        oldest = min(self._namers, default=self._namer_seq + 1)
        ready = [ino for newest, ino in self._deferred if newest < oldest]
        self._deferred = [(n, ino) for n, ino in self._deferred if n >= oldest]
        for ino in ready:
            if self.lookups[ino] <= 0 and self.opens[ino] <= 0:     # not named again
                await self._forget_now(ino)

    async def _maybe_forget(self, ino: int) -> None:
        if self.lookups[ino] <= 0 and self.opens[ino] <= 0:
            if self._namers:
                self._deferred.append((max(self._namers), ino))
            else:
                await self._forget_now(ino)

    async def _forget_now(self, ino: int) -> None:
        """Free what the kernel forgot. Never raises: a forget has no reply, and the
        request that runs it (a forget, or a namer that held it back) is not its cause."""
        self.lookups.pop(ino, None)
        self.opens.pop(ino, None)
        self._stamps.pop(ino, None)     # the kernel's inode, and its pages, are gone
        try:
            if ino in self._freed:      # freed at unlink, its number held till now
                self._freed.discard(ino)
                await self.fs.release_number(ino)
            else:
                await self.fs.forget(ino)
        except Exception:
            log.exception("forget of inode %#x failed; if it was unlinked it stays an "
                          "orphan until the next mount", ino)

    async def _uncount(self, entries) -> None:
        """Readdir entries counted but never sent to the kernel."""
        for _, attr, _ in entries:
            self.lookups[attr.ino] -= 1
            await self._maybe_forget(attr.ino)

    def _new_fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        self.opens[ino] += 1
        return fh

    def _ino(self, fh: int) -> int:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    async def forget(self, inode_list):
        # forget has no reply: nothing may leave it (pyfuse3 would end the mount), so
        # _forget_now logs each inode's failure and the others still go
        for ino, n in inode_list:
            self.lookups[ino] -= n
            if ino != pyfuse3.ROOT_INODE:
                await self._maybe_forget(ino)

    # ------------------------------------------------------------ names
    @translate
    async def lookup(self, parent_inode, name, ctx=None):
        nid = self._naming()
        try:
            attr = await self.fs.lookup(parent_inode, name)
            return self._looked_up(attr)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # a negative entry (st_ino 0): the kernel caches "no such name" for
            # ENTRY_TIMEOUT as it caches names that exist (a create through this mount
            # replaces it at once), so a create does not cost a lookup first
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = ENTRY_TIMEOUT
            return e
        finally:
            await self._named(nid)

    @translate
    async def getattr(self, inode, ctx=None):
        # A filesystem that keeps the attributes its updates' replies carried
        # (replication/client.py `getattr_cached`) answers from them, once, and says
        # how old they are: the kernel keeps them only for what is left of
        # ATTR_TIMEOUT, as if it had had them from the reply itself.
        cached = getattr(self.fs, "getattr_cached", None)
        if cached is None:
            return entry(await self.fs.getattr(inode))
        attr, age = await cached(inode)
        e = entry(attr)
        e.attr_timeout = max(0.0, ATTR_TIMEOUT - age)
        return e

    @translate
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {name: getattr(attr, src) for flag, name, src in SETATTR_FIELDS
              if getattr(fields, flag)}
        return entry(await self.fs.setattr(inode, **kw))

    @translate
    async def readlink(self, inode, ctx):
        return await self.fs.readlink(inode)

    @translate
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._looked_up(await self.fs.mknod(parent_inode, name, mode & ~ctx.umask,
                                                   rdev, ctx.uid, ctx.gid))

    @translate
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._looked_up(await self.fs.mkdir(parent_inode, name, mode & ~ctx.umask,
                                                   ctx.uid, ctx.gid))

    @translate
    async def unlink(self, parent_inode, name, ctx):
        # an inode that no handle of this mount holds is freed with its last name,
        # without an orphan and a second transaction at forget
        freed = await self.fs.unlink(parent_inode, name,
                                     keep=[i for i, n in self.opens.items() if n > 0])
        if freed is not None:
            self._freed.add(freed)
            if self.lookups[freed] <= 0 and self.opens[freed] <= 0:
                await self._maybe_forget(freed)     # the kernel forgot it meanwhile

    @translate
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(parent_inode, name)

    @translate
    async def symlink(self, parent_inode, name, target, ctx):
        return self._looked_up(await self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @translate
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @translate
    async def link(self, inode, new_parent_inode, new_name, ctx):
        nid = self._naming()
        try:
            return self._looked_up(await self.fs.link(inode, new_parent_inode, new_name))
        finally:
            await self._named(nid)

    # ------------------------------------------------------------ files
    @staticmethod
    def _stamp(attr) -> tuple:
        """The version of a file's contents, as fs/data.py's `version` gives it."""
        return (attr.generation, attr.mtime_ns, attr.ctime_ns, attr.size)

    def _keep_cache(self, attr) -> bool:
        """May the kernel keep its cached pages of `attr.ino` at this open, `attr` being
        the file's attributes just asked of the filesystem? Yes if its stamp is the one
        the kernel's pages are of: what the previous open saw, moved on by this
        mount's own writes since (`write`). If not, this open's stamp is remembered and
        the kernel's cached attributes are dropped too (the caller drops the pages)."""
        stamp = self._stamp(attr)
        if self._stamps.get(attr.ino) == stamp:
            return True
        self._stamps[attr.ino] = stamp
        self._invalidate_attrs(attr.ino)
        return False

    def _invalidate_attrs(self, ino: int) -> None:
        """Make the kernel ask for `ino`'s attributes again before it trusts its size.
        (Attributes only: with no writeback cache this never waits for the kernel.)"""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:
            log.warning("cannot invalidate the kernel's attributes of inode %#x: %s", ino, exc)

    @translate
    async def open(self, inode, flags, ctx):
        attr = await self.fs.getattr(inode)     # always asked: close-to-open
        if attr.mode & 0o170000 == 0o040000:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            # libfuse enables atomic O_TRUNC: the kernel leaves the truncation to us
            attr = await self.fs.setattr(inode, size=0)
        keep = self._keep_cache(attr)
        return pyfuse3.FileInfo(fh=self._new_fh(inode), keep_cache=keep)

    @translate
    async def create(self, parent_inode, name, mode, flags, ctx):
        attr = await self.fs.create(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        e = self._looked_up(attr)
        self._stamps[attr.ino] = self._stamp(attr)     # new: the kernel has no pages of it
        return pyfuse3.FileInfo(fh=self._new_fh(attr.ino)), e

    @translate
    async def read(self, fh, off, size):
        return await self.fs.read(self._ino(fh), off, size)

    @translate
    async def write(self, fh, off, buf):
        # the kernel copied `buf` into its pages of the file: if nothing but this write
        # changed the file since the version those pages are of, they are of the version
        # it made (the file's versions before and after, read in the write's transaction)
        ino = self._ino(fh)
        n, before, after = await self.fs.write(ino, off, buf, stamps=True)
        if before is not None and self._stamps.get(ino) == tuple(before):
            self._stamps[ino] = tuple(after)
        return n

    @translate
    async def fallocate(self, fh, mode, offset, length):
        # one call per chunk, each a transaction; the first counts the whole range's
        # blocks (ENOSPC up front), FileSystem.fallocate
        ino = self._ino(fh)
        end = offset + length
        done = await self.fs.fallocate(ino, mode, offset, length)
        while done < end:
            done = await self.fs.fallocate(ino, mode, done, end - done, reserve=False)

    @translate
    async def flush(self, fh):
        self._ino(fh)

    @translate
    async def release(self, fh):
        ino = self._handles.pop(fh, None)
        if ino is not None:
            self.opens[ino] -= 1
            await self._maybe_forget(ino)

    @translate
    async def fsync(self, fh, datasync):
        await self.fs.fsync(self._ino(fh))

    # ------------------------------------------------------------ directories
    @translate
    async def opendir(self, inode, ctx):
        attr = await self.fs.getattr(inode)
        if attr.mode & 0o170000 != 0o040000:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh(inode)
        self._listings[fh] = _Listing(attr)
        return fh

    @translate
    async def readdir(self, fh, start_id, token):
        # offsets: 1 after ".", 2 after "..", then the core's offsets + 2. "." and ".."
        # do not count as lookups (pyfuse3's contract).
        ino = self._ino(fh)
        listing = self._listings.get(fh)
        if start_id == 0:
            attr = listing.attr if listing is not None else await self.fs.getattr(ino)
            if not pyfuse3.readdir_reply(token, b".", entry(attr), 1):
                return
            start_id = 1
        if start_id == 1:
            if not pyfuse3.readdir_reply(token, b"..", entry(await self.fs.lookup(ino, b"..")), 2):
                return
            start_id = 2
        start = start_id - 2
        # the kernel's buffer takes some dozens of entries: what a batch had beyond them
        # waits (counted) in the listing for the next call instead of being asked again
        batch, dropped = listing.take(start) if listing is not None else (None, [])
        await self._uncount(dropped)
        while True:
            if batch is None:
                nid = self._naming()
                try:
                    batch = await self.fs.readdir(ino, start)
                    for _, attr, _ in batch:
                        self.lookups[attr.ino] += 1
                finally:
                    await self._named(nid)
            if not batch:
                return
            for i, (name, attr, nxt) in enumerate(batch):
                if not pyfuse3.readdir_reply(token, name, entry(attr), nxt + 2):
                    if listing is not None:
                        await self._uncount(listing.keep(start, batch[i:]))
                    else:
                        await self._uncount(batch[i:])
                    return
                start = nxt
            batch = None

    @translate
    async def releasedir(self, fh):
        listing = self._listings.pop(fh, None)
        if listing is not None:
            await self._uncount(listing.drop())
        await self.release(fh)

    @translate
    async def fsyncdir(self, fh, datasync):
        await self.fs.fsync(self._ino(fh))

    @translate
    async def statfs(self, ctx):
        st = await self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = st["bsize"]
        s.f_frsize = st["frsize"]
        s.f_blocks = st["blocks"]
        s.f_bfree = st["bfree"]
        s.f_bavail = st["bavail"]
        s.f_files = st["files"]
        s.f_ffree = st["ffree"]
        s.f_favail = st["favail"]
        s.f_namemax = st["namemax"]
        return s

    @translate
    async def access(self, inode, mode, ctx):
        # default_permissions: the kernel checks modes itself
        return True

    # ------------------------------------------------------------ xattrs
    # POSIX ACL names are refused here too (FileSystem.refuse_acl), before any cache of
    # a cluster client could answer ENODATA for them: the answer is always EOPNOTSUPP.
    @translate
    async def setxattr(self, inode, name, value, ctx):
        FileSystem.refuse_acl(name)
        await self.fs.setxattr(inode, name, value)

    @translate
    async def getxattr(self, inode, name, ctx):
        FileSystem.refuse_acl(name)
        return await self.fs.getxattr(inode, name)

    @translate
    async def listxattr(self, inode, ctx):
        return await self.fs.listxattr(inode)

    @translate
    async def removexattr(self, inode, name, ctx):
        FileSystem.refuse_acl(name)
        await self.fs.removexattr(inode, name)
