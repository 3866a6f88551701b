"""Fewer round trips per operation: post-operation attributes in update replies
(replication/postop.py), the client's use of them and of what it knows about missing
extended attributes, forgets sent in the background -- in process against a fake
server, then counted on a real mount."""

import ast
import errno
import logging
import os
import stat
import subprocess

import pytest
import trio
import trio.testing

from mounthelp import is_mounted
from replfs.fs.core import Attr
from replfs.fs.errors import FsError
from replfs.fs.layout import ROOT_SLOT, make_ino
from replfs.replication import wire
from replfs.replication.client import RemoteFS
from replfs.replication.config import ClusterConfig
from replfs.replication.postop import NoXattrs, PostOpAttrs, attrs_after, changed_inodes

D0, D1 = make_ino(0, ROOT_SLOT), make_ino(1, ROOT_SLOT)
F0, F1 = make_ino(0, 20), make_ino(1, 20)


def attr(ino, size=0, mode=stat.S_IFREG | 0o644):
    return Attr(**{**{f: 0 for f in Attr.__dataclass_fields__}, "ino": ino, "mode": mode,
                   "size": size, "nlink": 1})


# ---------------------------------------------------------------- which inodes
def test_changed_inodes_by_method():
    assert changed_inodes("create", [D0, b"n", 0o644, 0, 0]) == [D0]
    for m in ("mknod", "mkdir", "symlink", "unlink", "rmdir"):
        assert changed_inodes(m, [D0, b"n"]) == [D0]
    assert changed_inodes("rename", [D0, b"a", D1, b"b", 0]) == [D0, D1]
    assert changed_inodes("rename", [D0, b"a", D0, b"b", 0]) == [D0]
    assert changed_inodes("link", [F1, D0, b"l"]) == [F1, D0]
    for m in ("setattr", "write", "setxattr", "removexattr"):
        assert changed_inodes(m, [F0]) == [F0]
    for m in ("forget", "getattr", "lookup", "read", "fsync", "tx_prepare"):
        assert changed_inodes(m, [F0]) == []
    assert changed_inodes("rename", [D0]) == [] and changed_inodes("write", [b"x"]) == []


class FakeFS:
    def __init__(self, inodes):
        self.inodes = inodes

    async def getattr(self, ino):
        if ino not in self.inodes:
            raise FsError(errno.ENOENT, "gone")
        return self.inodes[ino]


async def test_attrs_after_reads_the_answering_groups_inodes_only():
    fs = FakeFS({D0: attr(D0, 1), F0: attr(F0, 2)})
    assert await attrs_after(fs, 0, "rename", [D0, b"a", D1, b"b", 0]) == [attr(D0, 1)]
    assert await attrs_after(fs, 0, "link", [F1, D0, b"l"]) == [attr(D0, 1)]
    assert await attrs_after(fs, 0, "unlink", [make_ino(0, 99), b"x"]) == []   # gone
    assert await attrs_after(fs, 0, "forget", [F0]) == []


# ---------------------------------------------------------------- the client's caches
def test_post_op_attrs_answered_once_and_within_the_ttl():
    c = PostOpAttrs(ttl=5.0)
    c.settle(c.begin([D0]), [attr(D0, 1), attr(F0, 9)], now=10.0)
    assert c.take(F0, 10.0) is None                 # not an inode the update changed
    assert c.take(D0, 12.0) == (attr(D0, 1), 2.0)
    assert c.take(D0, 12.0) is None                 # once
    c.settle(c.begin([D0]), [attr(D0, 2)], now=20.0)
    assert c.take(D0, 25.0) is None                 # too old
    c.settle(c.begin([D0]), [attr(D0, 3)], now=30.0)
    c.drop(D0)
    assert c.take(D0, 30.0) is None
    c.settle(c.begin([D0]), [attr(D0, 4)], now=40.0)
    c.settle(c.begin([D0]), [], now=41.0)           # a later update that failed
    assert c.take(D0, 41.0) is None


@pytest.mark.parametrize("first_ends_first", [True, False])
def test_post_op_attrs_of_overlapping_updates_are_not_kept(first_ends_first):
    c = PostOpAttrs(ttl=5.0)
    one = c.begin([D0, F0])
    two = c.begin([D0])
    ends = [(one, [attr(D0, 1), attr(F0, 1)]), (two, [attr(D0, 2)])]
    for marks, attrs in ends if first_ends_first else ends[::-1]:
        c.settle(marks, attrs, now=1.0)
    assert c.take(D0, 1.0) is None                  # which reply is newer is unknown
    assert c.take(F0, 1.0) == (attr(F0, 1), 0.0)    # F0 had no other update
    # and once both ended, the next one is kept again
    c.settle(c.begin([D0]), [attr(D0, 3)], now=2.0)
    assert c.take(D0, 2.0) == (attr(D0, 3), 0.0)


def test_post_op_attrs_bounded():
    c = PostOpAttrs(ttl=5.0, cap=3)
    for i in range(5):
        c.settle(c.begin([i]), [attr(i)], now=1.0)
    assert [c.take(i, 1.0) is not None for i in range(5)] == [False, False, True, True, True]


def test_no_xattrs_within_the_ttl_forgotten_on_a_change():
    x = NoXattrs(ttl=5.0)
    x.learn(F0, 0.0)
    assert x.absent(F0, 1.0, b"security.capability") and x.absent(F0, 1.0)
    assert not x.absent(F0, 5.0, b"user.a")
    x.learn(F1, 0.0, b"user.a")
    assert x.absent(F1, 1.0, b"user.a") and not x.absent(F1, 1.0, b"user.b")
    assert not x.absent(F1, 1.0)                    # one name missing is not all
    since = x.changes
    with x.changing(F1):
        x.learn(F1, 2.0, b"user.a", since=since)    # an answer that overlapped the change
    assert not x.absent(F1, 2.0, b"user.a")
    x.learn(F1, 2.0, b"user.a", since=since)        # the same, arriving after it
    assert not x.absent(F1, 2.0, b"user.a")
    x.learn(F1, 3.0, b"user.b", since=x.changes)
    assert x.absent(F1, 3.0, b"user.b")
    assert not NoXattrs(ttl=0).absent(F0, 0.0)


# ---------------------------------------------------------------- RemoteFS over a fake server
class FakeServer(RemoteFS):
    """A RemoteFS whose primaries are one table: replies as the real ones (values and
    post-operation attributes), every request recorded; `hold` blocks a method."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sent: list[str] = []
        self.inodes = {D0: attr(D0, mode=stat.S_IFDIR | 0o755)}
        self.xattrs: dict[int, dict] = {}
        self.hold: dict[str, trio.Event] = {}
        self.fail_forget = False
        self.next_slot = 100

    async def _call(self, w, group, lane, seq, method, args, kwargs):
        self.sent.append(method)
        if method in self.hold:
            await self.hold[method].wait()
        value, changed = None, changed_inodes(method, args)
        if method == "create":
            self.next_slot += 1
            ino = make_ino(0, self.next_slot)
            value = self.inodes[ino] = attr(ino)
        elif method == "getattr":
            if args[0] not in self.inodes:
                raise FsError(errno.ENOENT, "no such inode")
            value = self.inodes[args[0]]
        elif method == "getxattr":
            if args[1] not in self.xattrs.get(args[0], {}):
                raise FsError(errno.ENODATA, "no such attribute")
            value = self.xattrs[args[0]][args[1]]
        elif method == "listxattr":
            value = list(self.xattrs.get(args[0], {}))
        elif method == "setxattr":
            self.xattrs.setdefault(args[0], {})[args[1]] = args[2]
        elif method == "forget" and self.fail_forget:
            raise FsError(errno.EIO, "the log cannot be written")
        for ino in changed:
            old = self.inodes[ino]
            self.inodes[ino] = Attr(**{**old.__dict__, "size": old.size + 1})
        return wire.OpReply(0, value, 0, "", [self.inodes[i] for i in changed])


@pytest.fixture
async def rfs(tmp_path):
    f = FakeServer(ClusterConfig.create(tmp_path / "c", groups=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(f.run)
        yield f
        await f.aclose()
        nursery.cancel_scope.cancel()


async def test_client_answers_getattr_after_an_update_from_its_reply(rfs):
    f = await rfs.create(D0, b"f", 0o644, 0, 0)
    rfs.sent.clear()
    got, age = await rfs.getattr_cached(D0)
    assert got == rfs.inodes[D0] and 0 <= age < 1 and rfs.sent == []
    assert rfs.stats["attrs_from_replies"] == 1
    got, age = await rfs.getattr_cached(D0)         # once only: then the server's
    assert got == rfs.inodes[D0] and age == 0 and rfs.sent == ["getattr"]
    await rfs.write(f.ino, 0, b"x")
    rfs.sent.clear()
    assert (await rfs.getattr(f.ino)) == rfs.inodes[f.ino]     # getattr always asks
    assert rfs.sent == ["getattr"]
    rfs.sent.clear()
    assert (await rfs.getattr_cached(f.ino))[1] == 0 and rfs.sent == ["getattr"]
    with pytest.raises(FsError) as exc:             # a vanished inode is stale
        await rfs.getattr(make_ino(0, 999))
    assert exc.value.errno == errno.ESTALE


async def test_client_answers_xattr_probes_of_new_inodes_without_asking(rfs):
    f = await rfs.create(D0, b"f", 0o644, 0, 0)
    rfs.sent.clear()
    with pytest.raises(FsError) as exc:
        await rfs.getxattr(f.ino, b"security.capability")
    assert exc.value.errno == errno.ENODATA
    assert await rfs.listxattr(f.ino) == [] and rfs.sent == []
    assert rfs.stats["xattrs_known_absent"] == 2
    await rfs.setxattr(f.ino, b"user.a", b"1")
    assert await rfs.getxattr(f.ino, b"user.a") == b"1"
    assert await rfs.listxattr(f.ino) == [b"user.a"]
    with pytest.raises(FsError):
        await rfs.getxattr(f.ino, b"user.b")        # ENODATA: learnt for that name
    rfs.sent.clear()
    with pytest.raises(FsError):
        await rfs.getxattr(f.ino, b"user.b")
    assert await rfs.getxattr(f.ino, b"user.a") == b"1"
    assert rfs.sent == ["getxattr"]


async def test_client_forget_does_not_wait_and_is_drained_at_close(rfs, caplog):
    rfs.hold["forget"] = trio.Event()
    with trio.fail_after(1):
        await rfs.forget(F0)            # returns although the server has not answered
    await trio.testing.wait_all_tasks_blocked()
    assert rfs.sent == ["forget"] and rfs._forgets == 1

    async def release_soon():
        await trio.testing.wait_all_tasks_blocked()     # aclose is waiting by then
        assert rfs._forgets == 1
        rfs.hold["forget"].set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_soon)
        await rfs.aclose()              # waits for the forget to be answered
        assert rfs._forgets == 0
    del rfs.hold["forget"]
    rfs.fail_forget = True
    with caplog.at_level(logging.WARNING, logger="replfs.client"):
        await rfs.forget(F0)
        await trio.testing.wait_all_tasks_blocked()
    assert "forget of inode" in caplog.text and "cannot be written" in caplog.text


# ---------------------------------------------------------------- counted on a real mount
def unmount_counts(running) -> tuple[dict, dict]:
    """Unmount the running cluster's client; the (client stats, requests per method)
    it logged."""
    subprocess.run(["fusermount3", "-u", str(running.mnt)], capture_output=True, timeout=30)
    assert not is_mounted(running.mnt)
    running.cluster.procs["mount"].wait(30)
    line = [ln for ln in running.log("mount").splitlines() if "unmounted" in ln][-1]
    stats, requests = line.split("client stats ", 1)[1].split("; requests ")
    return ast.literal_eval(stats), ast.literal_eval(requests.rstrip(")"))


@pytest.mark.timeout(150)
@pytest.mark.slow
def test_creating_files_costs_no_getattr_or_getxattr_each(running):
    n = 50
    d = running.mnt / "d"
    d.mkdir()
    for i in range(n):
        with open(d / f"f{i}", "wb") as f:
            f.write(b"x" * 4096)
    for i in range(n):
        os.unlink(d / f"f{i}")
    assert os.listdir(d) == []
    stats, counts = unmount_counts(running)
    assert counts["create"] == n and counts["write"] == n and counts["unlink"] == n
    # before: one getattr of the directory after every create and unlink, and one
    # getxattr (security.capability) before every first write
    assert counts.get("getxattr", 0) == 0, counts
    assert counts.get("getattr", 0) <= 10, counts
    # nothing held them open: each unlink freed its inode at once, so the kernel's
    # forgets of them cost no request (fs/fuse_ops.py `_freed`); only a forget of the
    # directory itself, at unmount, may go out
    assert counts.get("forget", 0) < n // 5, counts
    assert stats["attrs_from_replies"] >= n and stats["xattrs_known_absent"] >= n, stats
