"""The filesystem state machine called in process (no FUSE), over a MemoryDevice."""

import errno
import os
import stat

import trio

from replfs.fs.core import RENAME_EXCHANGE, RENAME_NOREPLACE
from replfs.fs.errors import FsError
from replfs.fs.fsck import fsck
from replfs.fs.layout import BLOCK_SIZE, MAX_FILE_SIZE
from replfs.fs.mkfs import open_fs

ROOT = 1


def err(code):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            assert typ is FsError, f"expected FsError({errno.errorcode[code]}), got {typ}"
            assert exc.errno == code, f"expected {errno.errorcode[code]}, got {errno.errorcode[exc.errno]}"
            return True
    return _Ctx()


async def names(fs, ino):
    out, start = [], 0
    while True:
        batch = await fs.readdir(ino, start, 50)
        if not batch:
            return out
        out += [n for n, _, _ in batch]
        start = batch[-1][2]


async def test_create_lookup_getattr(fs):
    a = await fs.create(ROOT, b"a", 0o644, 1000, 1000)
    assert stat.S_ISREG(a.mode) and a.mode & 0o777 == 0o644
    assert (a.uid, a.gid, a.nlink, a.size) == (1000, 1000, 1, 0)
    assert (await fs.lookup(ROOT, b"a")).ino == a.ino
    assert (await fs.getattr(a.ino)).ino == a.ino
    with err(errno.EEXIST):
        await fs.create(ROOT, b"a", 0o644, 0, 0)
    with err(errno.ENOENT):
        await fs.lookup(ROOT, b"b")
    with err(errno.ENAMETOOLONG):
        await fs.create(ROOT, b"x" * 256, 0o644, 0, 0)
    await fs.create(ROOT, b"y" * 255, 0o644, 0, 0)
    assert (await fsck(fs)).clean


async def test_write_read_boundaries_and_holes(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    data = os.urandom(3 * BLOCK_SIZE + 100)
    assert await fs.write(f.ino, 1000, data) == len(data)
    assert await fs.read(f.ino, 1000, len(data)) == data
    assert await fs.read(f.ino, 0, 1000) == bytes(1000)
    assert (await fs.getattr(f.ino)).size == 1000 + len(data)
    # a sparse write far away: the hole reads as zeros and takes no space
    far = 10 * 2**30
    await fs.write(f.ino, far, b"end")
    a = await fs.getattr(f.ino)
    assert a.size == far + 3
    assert a.blocks * 512 < 64 * BLOCK_SIZE
    assert await fs.read(f.ino, far - 10, 13) == bytes(10) + b"end"
    assert await fs.read(f.ino, 5 * 2**30, 4096) == bytes(4096)
    # overwrite in the middle
    await fs.write(f.ino, 1000 + BLOCK_SIZE, b"Z" * 10)
    expect = data[:BLOCK_SIZE] + b"Z" * 10 + data[BLOCK_SIZE + 10:]
    assert await fs.read(f.ino, 1000, len(data)) == expect
    assert (await fsck(fs)).clean


async def test_one_tib_sparse_file_and_efbig(fs):
    f = await fs.create(ROOT, b"big", 0o644, 0, 0)
    await fs.write(f.ino, 2**40 - 4, b"tail")
    assert await fs.read(f.ino, 2**40 - 4, 4) == b"tail"
    with err(errno.EFBIG):
        await fs.write(f.ino, MAX_FILE_SIZE, b"x")
    with err(errno.EFBIG):
        await fs.setattr(f.ino, size=MAX_FILE_SIZE + 1)
    await fs.setattr(f.ino, size=0)
    assert (await fs.getattr(f.ino)).blocks == 0
    assert (await fsck(fs)).clean


async def test_truncate_zeroes_the_tail(fs):
    f = await fs.create(ROOT, b"t", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"A" * 10000)
    await fs.setattr(f.ino, size=5000)
    await fs.setattr(f.ino, size=10000)
    assert await fs.read(f.ino, 0, 10000) == b"A" * 5000 + bytes(5000)
    free_before = (await fs.statfs())["bfree"]
    await fs.setattr(f.ino, size=0)
    # two data blocks and the indirect block that mapped them
    assert (await fs.statfs())["bfree"] == free_before + 3
    assert (await fsck(fs)).clean


async def test_mkdir_rmdir_nlink(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert d.nlink == 2
    assert (await fs.getattr(ROOT)).nlink == 3
    await fs.mkdir(d.ino, b"sub", 0o755, 0, 0)
    assert (await fs.getattr(d.ino)).nlink == 3
    with err(errno.ENOTEMPTY):
        await fs.rmdir(ROOT, b"d")
    with err(errno.ENOTDIR):
        await fs.create(ROOT, b"file", 0o644, 0, 0) and await fs.rmdir(ROOT, b"file")
    with err(errno.EISDIR):
        await fs.unlink(ROOT, b"d")
    await fs.rmdir(d.ino, b"sub")
    await fs.rmdir(ROOT, b"d")
    assert (await fs.getattr(ROOT)).nlink == 2
    assert (await fs.lookup(ROOT, b"..")).ino == ROOT
    assert (await fsck(fs)).clean


async def test_link_unlink_and_orphans(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"data" * 2000)
    l = await fs.link(f.ino, ROOT, b"g")
    assert l.nlink == 2
    await fs.unlink(ROOT, b"f")
    assert (await fs.getattr(f.ino)).nlink == 1
    free_before = (await fs.statfs())["bfree"]
    await fs.unlink(ROOT, b"g")
    # still referenced (open): readable until forgotten
    assert (await fs.getattr(f.ino)).nlink == 0
    assert await fs.read(f.ino, 0, 4) == b"data"
    assert (await fsck(fs)).clean
    assert await fs.forget(f.ino)
    assert (await fs.statfs())["bfree"] == free_before + 3     # 2 data + 1 indirect
    with err(errno.ENOENT):
        await fs.getattr(f.ino)
    assert (await fsck(fs)).clean


async def test_orphans_reclaimed_at_mount(memdev):
    fs = await open_fs(memdev)
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"x" * 50000)
    await fs.unlink(ROOT, b"f")
    free = (await fs.statfs())["bfree"]
    await fs.close()
    fs = await open_fs(memdev)
    try:
        assert fs.orphans_reclaimed == 1
        assert (await fs.statfs())["bfree"] > free
        assert (await fsck(fs)).clean
    finally:
        await fs.close()


async def test_rename_rules(fs):
    a = await fs.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = await fs.mkdir(ROOT, b"b", 0o755, 0, 0)
    f = await fs.create(a.ino, b"f", 0o644, 0, 0)
    g = await fs.create(b.ino, b"g", 0o644, 0, 0)
    # plain move across directories
    await fs.rename(a.ino, b"f", b.ino, b"f2")
    assert (await fs.lookup(b.ino, b"f2")).ino == f.ino
    with err(errno.ENOENT):
        await fs.lookup(a.ino, b"f")
    # NOREPLACE
    with err(errno.EEXIST):
        await fs.rename(b.ino, b"f2", b.ino, b"g", RENAME_NOREPLACE)
    # replace a file: the old target goes away
    await fs.rename(b.ino, b"f2", b.ino, b"g")
    assert (await fs.lookup(b.ino, b"g")).ino == f.ino
    assert (await fs.getattr(g.ino)).nlink == 0
    await fs.forget(g.ino)
    # exchange
    h = await fs.create(a.ino, b"h", 0o644, 0, 0)
    await fs.rename(a.ino, b"h", b.ino, b"g", RENAME_EXCHANGE)
    assert (await fs.lookup(a.ino, b"h")).ino == f.ino
    assert (await fs.lookup(b.ino, b"g")).ino == h.ino
    # directory into its own subtree
    sub = await fs.mkdir(a.ino, b"sub", 0o755, 0, 0)
    with err(errno.EINVAL):
        await fs.rename(ROOT, b"a", sub.ino, b"x")
    with err(errno.EINVAL):
        await fs.rename(ROOT, b"a", a.ino, b"x")
    # dir over non-empty dir, dir over file, file over dir
    await fs.mkdir(b.ino, b"full", 0o755, 0, 0)
    await fs.create((await fs.lookup(b.ino, b"full")).ino, b"x", 0o644, 0, 0)
    with err(errno.ENOTEMPTY):
        await fs.rename(a.ino, b"sub", b.ino, b"full")
    with err(errno.ENOTDIR):
        await fs.rename(a.ino, b"sub", b.ino, b"g")
    with err(errno.EISDIR):
        await fs.rename(b.ino, b"g", a.ino, b"sub")
    # dir over empty dir, across parents: link counts follow
    await fs.mkdir(b.ino, b"empty", 0o755, 0, 0)
    await fs.rename(a.ino, b"sub", b.ino, b"empty")
    assert (await fs.getattr(a.ino)).nlink == 2
    assert (await fs.getattr(b.ino)).nlink == 4
    assert (await fs.lookup((await fs.lookup(b.ino, b"empty")).ino, b"..")).ino == b.ino
    # same file under two names: nothing happens
    await fs.link(h.ino, b.ino, b"h2")
    await fs.rename(b.ino, b"g", b.ino, b"h2")
    assert (await fs.lookup(b.ino, b"g")).ino == h.ino
    rep = await fsck(fs)
    assert rep.clean, rep.problems


async def test_big_directory_and_stable_readdir(fs):
    d = await fs.mkdir(ROOT, b"big", 0o755, 0, 0)
    n = 3000
    for i in range(n):
        await fs.create(d.ino, b"file-%05d" % i, 0o644, 0, 0)
    assert sorted(await names(fs, d.ino)) == sorted(b"file-%05d" % i for i in range(n))
    for i in range(0, n, 97):
        assert (await fs.lookup(d.ino, b"file-%05d" % i))
    # entries added and removed during a readdir cycle never make others skipped or doubled
    seen, start = [], 0
    keep = {b"file-%05d" % i for i in range(n) if i % 3}
    step = 0
    while True:
        batch = await fs.readdir(d.ino, start, 40)
        if not batch:
            break
        seen += [nm for nm, _, _ in batch]
        start = batch[-1][2]
        for j in range(20):      # churn: remove some, add others (causes splits)
            k = step * 20 + j
            if k < n and k % 3 == 0:
                await fs.unlink(d.ino, b"file-%05d" % k)
            await fs.create(d.ino, b"new-%05d" % k, 0o644, 0, 0)
        step += 1
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert keep <= set(seen), "an entry that stayed was skipped"
    rep = await fsck(fs)
    assert rep.clean, rep.problems


async def test_symlinks(fs):
    s = await fs.symlink(ROOT, b"s", b"target", 0, 0)
    assert stat.S_ISLNK(s.mode) and s.size == 6
    assert await fs.readlink(s.ino) == b"target"
    long = b"/x" * 1000
    s2 = await fs.symlink(ROOT, b"s2", long, 0, 0)
    assert await fs.readlink(s2.ino) == long
    with err(errno.ENAMETOOLONG):
        await fs.symlink(ROOT, b"s3", b"x" * 5000, 0, 0)
    assert (await fsck(fs)).clean


async def test_xattrs(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    await fs.setxattr(f.ino, b"user.a", b"1")
    await fs.setxattr(f.ino, b"user.b", b"2" * 100)
    assert await fs.getxattr(f.ino, b"user.a") == b"1"
    assert sorted(await fs.listxattr(f.ino)) == [b"user.a", b"user.b"]
    with err(errno.ENODATA):
        await fs.getxattr(f.ino, b"user.zz")
    with err(errno.EEXIST):
        await fs.setxattr(f.ino, b"user.a", b"x", 1)
    with err(errno.ENODATA):
        await fs.setxattr(f.ino, b"user.q", b"x", 2)
    await fs.removexattr(f.ino, b"user.a")
    await fs.removexattr(f.ino, b"user.b")
    assert await fs.listxattr(f.ino) == []
    with err(errno.E2BIG):
        await fs.setxattr(f.ino, b"user.big", b"x" * 10000)
    assert (await fsck(fs)).clean


async def test_enospc_leaves_nothing_half_done(fs):
    f = await fs.create(ROOT, b"fill", 0o644, 0, 0)
    before = await fs.statfs()
    chunk = b"x" * (256 * 1024)
    off = 0
    with err(errno.ENOSPC):
        while True:
            await fs.write(f.ino, off, chunk)
            off += len(chunk)
    # the failed write left nothing: size is what the successful writes made
    assert (await fs.getattr(f.ino)).size == off
    assert await fs.read(f.ino, off - 10, 10) == b"x" * 10
    rep = await fsck(fs)
    assert rep.clean, rep.problems
    await fs.unlink(ROOT, b"fill")
    await fs.forget(f.ino)
    assert (await fs.statfs())["bfree"] == before["bfree"]


async def test_setattr_times_and_mode(fs):
    f = await fs.create(ROOT, b"f", 0o4755, 0, 0)
    await fs.setattr(f.ino, atime_ns=10**18, mtime_ns=2 * 10**18)
    a = await fs.getattr(f.ino)
    assert (a.atime_ns, a.mtime_ns) == (10**18, 2 * 10**18)
    await fs.setattr(f.ino, mode=0o600, uid=5, gid=6)
    a = await fs.getattr(f.ino)
    assert stat.S_ISREG(a.mode) and a.mode & 0o7777 == 0o600 and (a.uid, a.gid) == (5, 6)


async def test_concurrent_creates_and_renames_are_serializable(memdev):
    from replfs.txn import HistoryRecorder, check_serializable
    hist = HistoryRecorder()
    fs = await open_fs(memdev, history=hist)
    try:
        a = await fs.mkdir(ROOT, b"a", 0o755, 0, 0)
        b = await fs.mkdir(ROOT, b"b", 0o755, 0, 0)

        async def worker(k):
            for i in range(30):
                name = b"w%d-%d" % (k, i)
                await fs.create(a.ino, name, 0o644, 0, 0)
                await fs.rename(a.ino, name, b.ino, name)
                if i % 2:
                    await fs.rename(b.ino, name, a.ino, name)
        async with trio.open_nursery() as n:
            for k in range(6):
                n.start_soon(worker, k)
        na, nb = await names(fs, a.ino), await names(fs, b.ino)
        assert len(na) == 6 * 15 and len(nb) == 6 * 15 and not set(na) & set(nb)
        res = check_serializable(hist)
        assert res, res
        assert (await fsck(fs)).clean
    finally:
        await fs.close()


async def test_lookup_and_create_do_not_scan_a_big_directory():
    """A directory of many thousands of entries: a lookup or create reads a bounded
    number of blocks (inode, block-map path, one bucket chain), not the directory."""
    from replfs.fs.mkfs import mkfs
    from replfs.raid.blockdev import MemoryDevice
    dev = MemoryDevice(65536)
    await mkfs(dev, inodes=32768)
    fs = await open_fs(dev)
    d = await fs.mkdir(ROOT, b"huge", 0o755, 0, 0)
    n = 12000
    for i in range(n):
        await fs.create(d.ino, b"entry-%06d" % i, 0o644, 0, 0)
    dev = fs.mgr.device
    reads = []
    orig = fs.mgr._read

    async def counting(txn, block, offset, size):
        reads.append(block)
        return await orig(txn, block, offset, size)
    fs.mgr._read = counting
    try:
        for i in range(0, n, 1000):
            reads.clear()
            assert (await fs.lookup(d.ino, b"entry-%06d" % i)).ino
            assert len(reads) <= 8, f"lookup read {len(reads)} blocks"
            reads.clear()
            await fs.create(d.ino, b"more-%06d" % i, 0o644, 0, 0)
            assert len(reads) <= 16, f"create read {len(reads)} blocks"
    finally:
        fs.mgr._read = orig
    assert len(await names(fs, d.ino)) == n + 12
    assert (await fsck(fs)).clean
    await fs.close()


async def test_failsafe_when_the_log_cannot_be_written():
    """When the device stops taking writes, the filesystem refuses writes (EIO, then
    EROFS) but keeps serving reads of what committed."""
    from replfs.fs.mkfs import mkfs
    from replfs.raid.blockdev import MemoryDevice

    class FailingDevice(MemoryDevice):
        broken = False

        async def flush(self):
            if self.broken:
                raise OSError(errno.EIO, "disk gone")
            await super().flush()

    dev = FailingDevice(8192)
    await mkfs(dev)
    fs = await open_fs(dev)
    f = await fs.create(ROOT, b"kept", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"committed")
    await fs.fsync()
    dev.broken = True
    await fs.create(ROOT, b"new", 0o644, 0, 0)     # a lazy commit: the log is not written yet
    with err(errno.EIO):
        await fs.fsync()
    with err(errno.EROFS):
        await fs.write(f.ino, 0, b"more")
    assert fs.failsafe
    assert await fs.read(f.ino, 0, 100) == b"committed"
    assert (await fs.lookup(ROOT, b"kept")).ino == f.ino


async def test_unlink_frees_at_once_what_nobody_holds_open(fs):
    """`keep` lists what the caller holds open: a last name of anything else frees the
    inode in the unlink's own transaction (no orphan, no second transaction at forget);
    an inode in `keep`, or one with another name, is left as before."""
    free_inodes = (await fs.statfs())["ffree"]
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"x" * 10000)
    assert await fs.unlink(ROOT, b"f", keep=[12345]) == f.ino
    with err(errno.ENOENT):
        await fs.getattr(f.ino)
    assert not await fs.forget(f.ino)           # nothing left to free
    # the number stays held (a kernel may still know it) until released
    assert (await fs.statfs())["ffree"] == free_inodes - 1
    other = await fs.create(ROOT, b"other", 0o644, 0, 0)
    assert other.ino != f.ino
    await fs.unlink(ROOT, b"other")
    await fs.forget(other.ino)
    await fs.release_number(f.ino)
    assert (await fs.statfs())["ffree"] == free_inodes
    assert (await fs.create(ROOT, b"again", 0o644, 0, 0)).ino == f.ino
    await fs.unlink(ROOT, b"again")
    await fs.forget(f.ino)
    g = await fs.create(ROOT, b"g", 0o644, 0, 0)
    await fs.write(g.ino, 0, b"open")
    assert await fs.unlink(ROOT, b"g", keep=[g.ino]) is None
    assert await fs.read(g.ino, 0, 4) == b"open"        # an orphan, still readable
    h = await fs.create(ROOT, b"h", 0o644, 0, 0)
    await fs.link(h.ino, ROOT, b"h2")
    assert await fs.unlink(ROOT, b"h", keep=[]) is None  # one name left
    assert (await fs.getattr(h.ino)).nlink == 1
    assert (await fsck(fs)).clean
    assert await fs.forget(g.ino)
    assert (await fsck(fs)).clean
