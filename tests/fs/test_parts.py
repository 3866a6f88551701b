"""Distributed parts (fs/parts.py `run_part`): each group runs its steps of a cross-group
operation in one transaction, prepared or committed, on real in-process filesystems of
two groups (the network protocol around them is tested in tests/replication)."""

import errno

import pytest

from replfs.fs.errors import ForeignInode, FsError, Stale
from replfs.fs.fsck import fsck
from replfs.fs.layout import S_IFDIR, S_IFREG, make_ino
from replfs.fs.mkfs import mkfs, open_fs
from replfs.raid.blockdev import MemoryDevice

ROOT = 1
DIR_T, REG_T = S_IFDIR >> 12, S_IFREG >> 12


@pytest.fixture
async def groups():
    devs = [MemoryDevice(4096), MemoryDevice(4096)]
    for g, dev in enumerate(devs):
        await mkfs(dev, group=g, inodes=2048)
    fss = [await open_fs(d) for d in devs]
    try:
        yield devs, fss
    finally:
        for f in fss:
            if not f.mgr.closed:
                await f.close()


async def prepare(fs, steps, gtid="t"):
    async def finish(txn, results):
        await txn.prepare({"gtid": gtid, "coord": 0})
    return await fs.run_part(steps, finish)


async def commit_now(fs, steps):
    async def finish(txn, results):
        await txn.commit()
    return await fs.run_part(steps, finish)


async def remote_mkdir(g0, g1, name):
    p1 = await prepare(g1, [["new_dir", ROOT, 0o755, 0, 0]])
    ino = p1.results[0].ino
    await commit_now(g0, [["link_entry", ROOT, name, ino, DIR_T, 0, 1]])
    await p1.commit()
    return ino


async def test_mkdir_in_other_group_and_rename_across(groups):
    _, (g0, g1) = groups
    b = await remote_mkdir(g0, g1, b"b")
    assert b >> 48 == 1
    with pytest.raises(ForeignInode) as ei:
        await g0.lookup(ROOT, b"b")
    assert ei.value.ino == b and ei.value.errno == errno.EXDEV
    assert (await g0.getattr(ROOT)).nlink == 3
    assert (await g1.getattr(b)).nlink == 2
    with pytest.raises(ForeignInode):
        await g1.lookup(b, b"..")
    a = (await g0.mkdir(ROOT, b"a", 0o755, 0, 0)).ino
    f = (await g0.create(a, b"f", 0o644, 0, 0)).ino
    await g0.write(f, 0, b"hello")
    # rename a/f -> b/g: group 1 prepares its entry, group 0 commits (the decision)
    p1 = await prepare(g1, [["link_entry", b, b"g", f, REG_T, 0, 0]])
    await commit_now(g0, [["unlink_entry", a, b"f", f, 0], ["move_child", f, False, 0, 0]])
    await p1.commit()
    assert [(n, x) for n, x, _ in await g1.readdir(b, 0)] == [(b"g", f)]   # foreign: an ino
    assert await g0.read(f, 0, 10) == b"hello"
    with pytest.raises(FsError):
        await g0.lookup(a, b"f")
    # the file's own group still sees one link; both groups are internally sound
    assert (await g0.getattr(f)).nlink == 1


async def test_abort_undoes_and_releases(groups):
    _, (g0, g1) = groups
    b = await remote_mkdir(g0, g1, b"b")
    f = (await g0.create(ROOT, b"f", 0o644, 0, 0)).ino
    p1 = await prepare(g1, [["link_entry", b, b"x", f, REG_T, 0, 0]])
    await p1.abort()
    assert await g1.readdir(b, 0) == []
    # the directory's lock is free again: a local create there goes through
    await g1.create(b, b"y", 0o644, 0, 0)


async def test_steps_recheck_the_plan(groups):
    _, (g0, g1) = groups
    a = (await g0.mkdir(ROOT, b"a", 0o755, 0, 0)).ino
    f = (await g0.create(a, b"f", 0o644, 0, 0)).ino
    with pytest.raises(Stale):
        await commit_now(g0, [["unlink_entry", a, b"f", f + 1, 0]])
    with pytest.raises(Stale):
        await commit_now(g0, [["link_entry", a, b"f", f, REG_T, 0, 0]])    # name taken
    d = (await g0.mkdir(a, b"d", 0o755, 0, 0)).ino
    await g0.create(d, b"inside", 0o644, 0, 0)
    with pytest.raises(FsError) as ei:
        await commit_now(g0, [["drop_link", d, True]])
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(Stale):
        await commit_now(g0, [["expect_parent", d, ROOT]])
    assert (await fsck(g0)).clean


async def test_prepared_part_survives_restart_in_doubt(groups):
    (d0, d1), (g0, g1) = groups
    b = await remote_mkdir(g0, g1, b"b")
    f = (await g0.create(ROOT, b"f", 0o644, 0, 0)).ino
    await prepare(g1, [["link_entry", b, b"f", f, REG_T, 0, 0]], gtid="0.x.7")
    await g1.close()                       # prepared transactions stay in the log
    g1 = await open_fs(d1)
    groups[1][1] = g1
    doubt = g1.mgr.in_doubt()
    assert [t.payload["gtid"] for t in doubt] == ["0.x.7"]
    part = g1.resume_part(doubt[0])
    await part.commit()
    assert [(n, x) for n, x, _ in await g1.readdir(b, 0)] == [(b"f", f)]
    assert g1.mgr.in_doubt() == []


async def test_foreign_inode_is_never_touched(groups):
    _, (g0, g1) = groups
    foreign = make_ino(1, 5)
    with pytest.raises(ForeignInode):
        await g0.getattr(foreign)
    with pytest.raises(ForeignInode):
        await g0.rename(ROOT, b"x", foreign, b"y")


async def test_a_commit_cancelled_by_its_caller_still_commits_whole(groups):
    """The participant's COMMIT handler can be cancelled (its coordinator's connection
    broke) while it commits: the part is committed all the same, with its allocations
    settled, and fsck is clean -- the coordinator's successor re-delivers the decision
    and finds it committed (replication/twopc.py `_Prepared.committed`)."""
    import trio
    _, (g0, g1) = groups
    p1 = await prepare(g1, [["new_dir", ROOT, 0o755, 0, 0]])
    ino = p1.results[0].ino
    await commit_now(g0, [["link_entry", ROOT, b"b", ino, DIR_T, 0, 1]])
    rec = None
    with trio.CancelScope() as scope:
        scope.cancel()
        rec = await p1.commit()         # runs to its end: the record is the caller's
    assert rec is not None and rec.txn == p1.txn.id
    assert p1.txn.state == "committed"
    assert (await g1.getattr(ino)).nlink == 2
    assert (await fsck(g1)).clean
