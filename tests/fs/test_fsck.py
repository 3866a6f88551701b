"""fsck finds each kind of damage and --repair fixes it (damage made in process with the
same transactions the filesystem uses, so the log stays consistent)."""

from replfs.fs import directory
from replfs.fs.fsck import fsck
from replfs.fs.op import Op

ROOT = 1


async def damage(fs, fn):
    async def run(txn):
        await fn(Op(fs, txn))
    await fs.mgr.run(run, name="damage")


async def test_fsck_clean_fs(fs):
    await fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"x" * 100000)
    rep = await fsck(fs)
    assert rep.clean, rep.problems
    assert rep.inodes >= 2 and rep.directories >= 3


async def test_fsck_finds_and_repairs_damage(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    f = await fs.create(d.ino, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"y" * 50000)
    g = await fs.create(ROOT, b"g", 0o644, 0, 0)
    lost = await fs.create(ROOT, b"lost", 0o644, 0, 0)

    async def wrong_nlink(op):
        node = await op.inode(g.ino, "X")
        node.nlink = 5
        await op.put(g.ino, node)

    async def drop_entry(op):            # "lost" becomes unreachable
        root = await op.inode(ROOT, "X")
        await directory.remove(op, root, b"lost")
        await op.put(ROOT, root)

    async def dangling(op):              # an entry pointing to a free inode
        root = await op.inode(ROOT, "X")
        await directory.insert(op, root, b"ghost", 4000, 8)
        await op.put(ROOT, root)

    async def leak_and_free(op):         # a used block marked free, a free block marked used
        node = await op.inode(f.ino, "S")
        await op.txn.write(*fs.bmap._locate(node.root), b"\0")
        free_blk = fs.bmap.mem.find(b"\0", fs.sb.data_start + 100)
        await op.txn.write(*fs.bmap._locate(free_blk), b"\1")

    for fn in (wrong_nlink, drop_entry, dangling, leak_and_free):
        await damage(fs, fn)
    # the in-memory maps must reflect what is on disk for fsck to see the damage
    await fs.close()
    from replfs.fs.mkfs import open_fs
    fs2 = await open_fs(fs.mgr.device)
    try:
        # alone, an inode that no directory names may be named from another group
        alone = await fsck(fs2)
        assert "unreachable" not in "\n".join(alone.problems)
        assert any("named in no directory" in n for n in alone.notes)
        # external=[]: this filesystem is the whole namespace
        rep = await fsck(fs2, external=[])
        text = "\n".join(rep.problems)
        assert "link count 5" in text
        assert "unreachable" in text
        assert "not allocated" in text
        assert "marked free" in text
        assert "belong to no inode" in text
        rep = await fsck(fs2, repair=True, external=[])
        assert rep.repaired
        again = await fsck(fs2, external=[])
        assert again.clean, again.problems
        lf = (await fs2.lookup(ROOT, b"lost+found")).ino
        assert (await fs2.lookup(lf, b"#%d" % lost.ino)).ino == lost.ino
        assert await fs2.read(f.ino, 0, 10) == b"y" * 10
    finally:
        await fs2.close()


async def blocks_of(fs, ino):
    from replfs.fs import blockmap

    async def fn(txn):
        op = Op(fs, txn)
        return await blockmap.all_blocks(op, await op.inode(ino, "S"))
    return await fs.mgr.run(fn, name="blocks")


async def test_block_owners_names_files_and_regions(fs):
    """`status` names the files of lost blocks with fsck's scan (fs/owners.py)."""
    from replfs.fs.owners import block_owners
    d = await fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    f = await fs.create(d.ino, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"y" * 3 * 4096)
    g = await fs.create(ROOT, b"g", 0o644, 0, 0)
    await fs.write(g.ino, 0, b"z" * 4096)
    fb, gb = await blocks_of(fs, f.ino), await blocks_of(fs, g.ino)
    unused = fs.bmap.mem.find(b"\0", fs.sb.data_start)
    sb = fs.sb
    found = await block_owners(fs, fb[:2] + gb + [sb.log_start + 3, unused])
    assert [(x["path"], x["ino"], x["blocks"]) for x in found["files"]] == [
        ("/d/f", f.ino, sorted(fb[:2])), ("/g", g.ino, gb)]
    assert found["other"] == {"log": 1, "unused": 1} and found["more_files"] == 0
    # bounded: the file with the most lost blocks first, the rest counted
    found = await block_owners(fs, fb + gb, limit=1)
    assert [x["path"] for x in found["files"]] == ["/d/f"] and found["more_files"] == 1
