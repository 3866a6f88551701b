"""The mount adapter's reference counting against inode-number reuse: a forget that
arrives while a lookup or readdir of the same inode is on its way must not free the
inode (its number could be handed out again while the kernel still gets a reply naming
the old one, and the kernel then marks the new inode bad: EIO). The real race is hit by
tests/fs/test_concurrency.py through a mount; here each interleaving is made on purpose."""

import errno

import pyfuse3
import pytest
import trio
import trio.testing

from replfs.fs.core import Attr
from replfs.fs.errors import FsError
from replfs.fs.fuse_ops import Operations

pytestmark = pytest.mark.timeout(30)

DIR, X = 1, 77


def attr(ino, mode=0o100644):
    return Attr(ino, mode, 1, 0, 0, 0, 0, 0, 0, 0, 0, 5)


class SlowFs:
    """Answers lookup/readdir of X only when `go` is set; records what is freed."""

    def __init__(self):
        self.go = trio.Event()
        self.freed: list = []

    async def lookup(self, parent, name):
        await self.go.wait()
        return attr(X)

    async def readdir(self, ino, start):
        if start:
            return []
        await self.go.wait()
        return [(b"x", attr(X), 1), (b"y", attr(X + 1), 2)]

    async def getattr(self, ino):
        return attr(ino, 0o040755)

    async def forget(self, ino):
        self.freed.append(("forget", ino))

    async def release_number(self, ino):
        self.freed.append(("release", ino))

    async def unlink(self, parent, name, keep=None):
        raise FsError(errno.ENOENT, "not used")


async def test_a_forget_during_a_lookup_of_the_inode_waits_and_frees_nothing():
    fs = SlowFs()
    ops = Operations(fs)
    ops.lookups[X] = 1                      # the kernel knows X from before
    async with trio.open_nursery() as n:
        n.start_soon(ops.lookup, DIR, b"x")
        await trio.testing.wait_all_tasks_blocked()
        await ops.forget([(X, 1)])          # the kernel drops its old reference
        assert fs.freed == []               # not while the lookup is on its way
        fs.go.set()
    assert fs.freed == []                   # the lookup named it again
    assert ops.lookups[X] == 1
    await ops.forget([(X, 1)])
    assert fs.freed == [("forget", X)]


async def test_a_forget_waits_for_a_readdir_and_unsent_entries_stay_counted(monkeypatch):
    fs = SlowFs()
    ops = Operations(fs)
    fh = await ops.opendir(DIR, None)
    ops.lookups[X] = 1
    sent = []

    def reply(token, name, e, off):         # the kernel's buffer has room for one entry
        if name in (b".", b".."):
            return True
        if sent:
            return False
        sent.append(name)
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    async with trio.open_nursery() as n:
        n.start_soon(ops.readdir, fh, 2, None)
        await trio.testing.wait_all_tasks_blocked()
        await ops.forget([(X, 1)])
        assert fs.freed == []
        fs.go.set()
    assert sent == [b"x"] and fs.freed == []
    assert ops.lookups[X] == 1 and ops.lookups[X + 1] == 1     # y waits, counted
    await ops.releasedir(fh)                                    # y never sent
    assert ("forget", X + 1) in fs.freed and ("forget", X) not in fs.freed
