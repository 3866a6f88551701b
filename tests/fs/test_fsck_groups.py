"""fsck across replica groups: two filesystems (group 0 and group 1) holding, built by hand
in transactions, exactly what cross-group operations leave (a file and a directory renamed
into a directory of the other group, a directory made in the other group, a hard link from
the other group); clean alone and together, then broken in each way that only the other
group's names can reveal; a transaction in doubt is reported without a scan; and `replfs
fsck CLUSTERDIR` on real arrays."""

import json
import os

import pytest
import trio

from replfs.fs import directory
from replfs.fs.fsck import DT_DIR, fsck, incoming, remove_entries
from replfs.fs.layout import ROOT_SLOT, make_ino
from replfs.fs.mkfs import mkfs, open_fs
from replfs.fs.op import Op
from replfs.raid.blockdev import MemoryDevice

pytestmark = pytest.mark.timeout(60)

ROOT0 = make_ino(0, ROOT_SLOT)
DT_REG = 8


async def txn(fs, fn):
    ops = []

    async def run(t):
        ops.append(Op(fs, t))
        return await fn(ops[-1])
    result = await fs.mgr.run(run, name="by-hand")
    ops[-1].committed()         # the allocation maps and getattr's cache follow
    return result


async def insert(fs, d, name, ino, typ, dlinks=0):
    async def fn(op):
        node = await op.inode(d, "X")
        await directory.insert(op, node, name, ino, typ)
        node.nlink += dlinks
        await op.put(d, node)
    await txn(fs, fn)


async def remove(fs, d, name, dlinks=0):
    async def fn(op):
        node = await op.inode(d, "X")
        got = await directory.remove(op, node, name)
        node.nlink += dlinks
        await op.put(d, node)
        return got
    return await txn(fs, fn)


async def setnode(fs, ino, **kw):
    async def fn(op):
        node = await op.inode(ino, "X", must_exist=False)
        for k, v in kw.items():
            setattr(node, k, v(getattr(node, k)) if callable(v) else v)
        await op.put(ino, node)
    await txn(fs, fn)


async def mkdir_in(fss, parent, name):
    """A directory of group g named from `parent` of another group: made in g's root (its
    allocation), then taken out of it and given its parent, as a cross-group mkdir leaves it."""
    g = 1 - (parent >> 48)
    fs, pfs = fss[g], fss[parent >> 48]
    a = await fs.mkdir(fs.root_ino, b"tmp", 0o755, 0, 0)
    await remove(fs, fs.root_ino, b"tmp", dlinks=-1)
    await setnode(fs, a.ino, parent=parent)
    await insert(pfs, parent, name, a.ino, DT_DIR, dlinks=1)
    return a.ino


async def rename_across(fss, src, name, dst, new):
    """Move entry `name` of `src` to `new` in `dst` (another group); the inode stays where
    it is."""
    sfs, dfs = fss[src >> 48], fss[dst >> 48]
    ino, typ = await remove(sfs, src, name, dlinks=0)
    isdir = typ == DT_DIR
    if isdir:
        await setnode(sfs, src, nlink=lambda n: n - 1)
        await setnode(fss[ino >> 48], ino, parent=dst)
    await insert(dfs, dst, new, ino, typ, dlinks=1 if isdir else 0)
    return ino


async def build(fss):
    """/d1 (group 1) holding f (group 0, renamed in), g and sub (group 1), hl (a link to
    /f0 of group 0), x (a group-0 directory made from d1); /e (a group-1 directory renamed
    into /)."""
    fs0, fs1 = fss
    ids = {}
    ids["d1"] = await mkdir_in(fss, ROOT0, b"d1")
    f = await fs0.create(ROOT0, b"f", 0o644, 0, 0)
    await fs0.write(f.ino, 0, b"data" * 1000)
    ids["f"] = await rename_across(fss, ROOT0, b"f", ids["d1"], b"f")
    ids["g"] = (await fs1.create(ids["d1"], b"g", 0o644, 0, 0)).ino
    ids["sub"] = (await fs1.mkdir(ids["d1"], b"sub", 0o755, 0, 0)).ino
    ids["f0"] = (await fs0.create(ROOT0, b"f0", 0o644, 0, 0)).ino
    await insert(fs1, ids["d1"], b"hl", ids["f0"], DT_REG)
    await setnode(fs0, ids["f0"], nlink=2)
    ids["x"] = await mkdir_in(fss, ids["d1"], b"x")
    e = await fs1.mkdir(ids["d1"], b"e", 0o755, 0, 0)
    ids["e"] = await rename_across(fss, ids["d1"], b"e", ROOT0, b"e")
    assert e.ino == ids["e"]
    return ids


@pytest.fixture
async def groups():
    fss = []
    for g in (0, 1):
        dev = MemoryDevice(2048)
        await mkfs(dev, group=g, inodes=512)
        fss.append(await open_fs(dev))
    try:
        ids = await build(fss)
        yield fss, ids
    finally:
        for fs in fss:
            await fs.close()


async def check_all(fss, **kw):
    alone = [await fsck(fs) for fs in fss]
    return [await fsck(fs, external=incoming(fs.sb.group, alone), **kw) for fs in fss]


async def test_cross_group_state_is_clean(groups):
    fss, ids = groups
    r0, r1 = [await fsck(fs) for fs in fss]
    assert r0.clean and r1.clean, r0.problems + r1.problems
    assert any("checked alone" in n for n in r0.notes)
    assert set(r0.outgoing) == {(ROOT0, b"d1", ids["d1"], DT_DIR), (ROOT0, b"e", ids["e"], DT_DIR)}
    assert set(r1.outgoing) == {(ids["d1"], b"f", ids["f"], DT_REG),
                                (ids["d1"], b"hl", ids["f0"], DT_REG),
                                (ids["d1"], b"x", ids["x"], DT_DIR)}
    assert r0.foreign_parents == {ids["x"]: ids["d1"]}
    assert r1.foreign_parents == {ids["d1"]: ROOT0, ids["e"]: ROOT0}
    # group 1 alone: d1 and e are named from elsewhere (a note, not a problem)
    assert any("named in no directory" in n for n in r1.notes)
    for rep in await check_all(fss):
        assert rep.clean, rep.problems
        assert not any("named in no directory" in n for n in rep.notes)
    # link counts as the filesystem sees them
    assert (await fss[0].getattr(ROOT0)).nlink == 4            # d1 and e
    assert (await fss[1].getattr(ids["d1"])).nlink == 4        # sub and x


async def test_state_left_by_distributed_parts_is_clean():
    """The same, made by the filesystem's own distributed parts (fs/parts.py run_part),
    committed in each group as the coordinator's decision would."""
    fss = []
    for g in (0, 1):
        dev = MemoryDevice(2048)
        await mkfs(dev, group=g, inodes=512)
        fss.append(await open_fs(dev))
    g0, g1 = fss

    async def part(fs, *steps):
        async def finish(t, results):
            await t.commit()
        return (await fs.run_part(list(steps), finish)).results

    try:
        b = (await part(g1, ["new_dir", ROOT0, 0o755, 0, 0]))[0].ino          # mkdir /b
        await part(g0, ["link_entry", ROOT0, b"b", b, DT_DIR, 0, 1])
        s = (await g0.mkdir(ROOT0, b"s", 0o755, 0, 0)).ino                     # mv /s /b/s
        await g0.create(s, b"inside", 0o644, 0, 0)
        await part(g1, ["link_entry", b, b"s", s, DT_DIR, 0, 1])
        await part(g0, ["unlink_entry", ROOT0, b"s", s, -1], ["move_child", s, True, ROOT0, b])
        f = (await g0.create(ROOT0, b"f", 0o644, 0, 0)).ino                    # ln /f /b/h
        await part(g1, ["link_entry", b, b"h", f, DT_REG, 0, 0])
        await part(g0, ["add_link", f])
        u = (await g0.create(ROOT0, b"u", 0o644, 0, 0)).ino                    # mv /u /b/u
        await part(g1, ["link_entry", b, b"u", u, DT_REG, 0, 0])
        await part(g0, ["unlink_entry", ROOT0, b"u", u, 0], ["move_child", u, False, 0, 0])
        await part(g1, ["unlink_entry", b, b"h", f, 0])                        # rm /b/h
        await part(g0, ["drop_link", f, False])
        for fs in fss:
            assert (await fsck(fs)).clean
        r0, r1 = await check_all(fss)
        assert r0.clean and r1.clean, r0.problems + r1.problems
        assert r0.foreign_parents == {s: b} and r1.foreign_parents == {b: ROOT0}
        assert (await g0.getattr(f)).nlink == 1
        # rm /f: its last name goes, the inode waits in group 0's orphans
        await g0.unlink(ROOT0, b"f")
        r0, r1 = await check_all(fss)
        assert r0.clean and r1.clean, r0.problems + r1.problems
    finally:
        for fs in fss:
            await fs.close()


async def test_extra_name_from_other_group(groups):
    fss, ids = groups
    # group 1 names group 0's f0 once more, and names group 0's directory x a second time
    await insert(fss[1], ids["d1"], b"extra", ids["f0"], DT_REG)
    await insert(fss[1], ids["d1"], b"x2", ids["x"], DT_DIR, dlinks=1)
    alone = await fsck(fss[0])
    assert alone.clean, alone.problems        # alone, group 0 cannot know
    r0, r1 = await check_all(fss)
    assert r1.clean, r1.problems
    text = "\n".join(r0.problems)
    assert f"inode {ids['f0']} (file) has link count 2, but 3 names" in text
    assert f"directory {ids['x']} has 2 names" in text
    # repair with the other group's names: the link count; the double name stays
    r0, _ = await check_all(fss, repair=True)
    assert any("link count" in r for r in r0.repaired)
    r0, _ = await check_all(fss)
    assert [p for p in r0.problems if "has 2 names" not in p] == []


async def test_missing_name_from_other_group(groups):
    fss, ids = groups
    await remove(fss[0], ROOT0, b"d1", dlinks=-1)     # d1's only name is gone
    r1 = await fsck(fss[1])
    assert r1.clean, r1.problems                      # alone: maybe named elsewhere
    r0, r1 = await check_all(fss)
    assert r0.clean, r0.problems                      # root's link count was kept right
    assert any(f"inode {ids['d1'] >> 48}:{ids['d1'] & 0xffff} (directory) is allocated but "
               "unreachable (it records parent 1 in group 0, which does not name it)" in p
               for p in r1.problems), r1.problems
    # group 1 cannot link it into the namespace: reported, not "repaired"
    r0, r1 = await check_all(fss, repair=True)
    assert not r1.clean and any("not relinked" in n for n in r1.notes)


async def test_wrong_link_count_is_repaired_only_with_external(groups):
    fss, ids = groups
    await setnode(fss[0], ids["f"], nlink=3)      # f: one name, in group 1
    alone = await fsck(fss[0], repair=True)
    assert alone.clean and not alone.repaired
    assert any("more links than names" in n for n in alone.notes)
    assert (await fss[0].getattr(ids["f"])).nlink == 3
    r0, _ = await check_all(fss)
    assert any("link count 3, but 1 names" in p for p in r0.problems), r0.problems
    r0, _ = await check_all(fss, repair=True)
    assert (await fss[0].getattr(ids["f"])).nlink == 1
    for rep in await check_all(fss):
        assert rep.clean, rep.problems
    # too few links is wrong even alone (but repairing it needs the whole cluster)
    await setnode(fss[0], ids["f0"], nlink=0)
    alone = await fsck(fss[0], repair=True)
    assert any("names in this group alone" in p for p in alone.problems)
    assert (await fss[0].getattr(ids["f0"])).nlink == 0
    await check_all(fss, repair=True)
    assert (await fss[0].getattr(ids["f0"])).nlink == 2


async def test_dangling_foreign_parent(groups):
    fss, ids = groups
    bogus = make_ino(0, 400)                        # a free inode of group 0
    await setnode(fss[1], ids["e"], parent=bogus)   # e is named from group 0's root
    alone = await fsck(fss[1], repair=True)
    assert alone.clean and not alone.repaired       # alone: maybe bogus names it
    assert alone.foreign_parents[ids["e"]] == bogus
    r0, r1 = await check_all(fss)
    assert r0.clean
    assert any(f"records parent {bogus}, but is in 1" in p for p in r1.problems), r1.problems
    await check_all(fss, repair=True)
    for rep in await check_all(fss):
        assert rep.clean, rep.problems

    async def parent(op):
        return (await op.inode(ids["e"])).parent
    assert await txn(fss[1], parent) == ROOT0


async def test_entry_naming_an_inode_the_other_group_lacks(groups):
    fss, ids = groups
    ghost = make_ino(0, 300)
    await insert(fss[1], ids["d1"], b"ghost", ghost, DT_REG)
    assert (await fsck(fss[1])).clean           # not group 1's to check
    r0, r1 = await check_all(fss)
    assert r1.clean
    assert r0.dangling_incoming == [(ids["d1"], b"ghost", ghost, DT_REG)]
    assert any("'ghost'" in p and "not allocated" in p for p in r0.problems)
    assert await remove_entries(fss[1], r0.dangling_incoming)
    for rep in await check_all(fss):
        assert rep.clean, rep.problems


async def test_group_root_must_stay_empty(groups):
    fss, ids = groups
    await fss[1].create(fss[1].root_ino, b"stray", 0o644, 0, 0)
    rep = await fsck(fss[1])
    assert any("root directory of group 1 is not empty" in p for p in rep.problems)


async def test_in_doubt_transaction_is_reported_without_a_scan():
    dev = MemoryDevice(2048)
    await mkfs(dev, group=0, inodes=512)
    fs = await open_fs(dev)
    f = await fs.create(ROOT0, b"f", 0o644, 0, 0)
    await fs.fsync()
    # a 2PC participant's prepared transaction (a rename out of this group): root and f
    t = fs.mgr.begin("participant")
    op = Op(fs, t)
    root = await op.inode(ROOT0, "X")
    await directory.remove(op, root, b"f")
    await op.put(ROOT0, root)
    await op.inode(f.ino, "X")
    await t.prepare({"gtid": ["coordinator", 1]})
    with trio.fail_after(10):
        rep = await fsck(fs, repair=True, external=[])
    assert rep.problems == ["1 distributed transaction in doubt: start the cluster so "
                            "their coordinators resolve them"]
    assert not rep.scanned and not rep.repaired
    # after a crash it is still in doubt, with its locks
    dev.crash()
    fs = await open_fs(dev, reclaim=False)
    try:
        (doubt,) = fs.mgr.in_doubt()
        with trio.fail_after(10):
            rep = await fsck(fs)
        assert rep.in_doubt == 1 and not rep.clean and not rep.scanned
        await doubt.abort()
        rep = await fsck(fs, external=[])
        assert rep.clean, rep.problems
        assert (await fs.lookup(ROOT0, b"f")).ino == f.ino
    finally:
        await fs.close()


# ------------------------------------------------------------------ the command

def make_cluster(tmp_path, damage=None):
    """A stopped cluster of two groups of two replicas, each with a small array, holding
    the cross-group state of `build` (made the same way on each replica pair)."""
    from replfs.raid import create_array
    from replfs.replication import amo
    from replfs.replication.config import ClusterConfig
    from replfs.tools.replica_array import _Shorter

    d = str(tmp_path / "cluster")
    cfg = ClusterConfig.create(d, replicas=4, disks=3, disk_size=2 << 20)
    cfg.groups = {0: ["s0", "s1"], 1: ["s2", "s3"]}
    cfg.save()

    async def go():
        for pair in (("s0", "s2"), ("s1", "s3")):
            arrays, fss = [], []
            try:
                for g, s in enumerate(pair):
                    arr = create_array(cfg.server_dir(s), 3, 2 << 20, chunk=16 * 1024)
                    arrays.append(arr)
                    dev = _Shorter(arr, arr.nblocks - amo.TAIL_BLOCKS)
                    await mkfs(dev, group=g)
                    fss.append(await open_fs(arr))
                ids = await build(fss)
                if damage:
                    await damage(fss, ids)
            finally:
                for fs in fss:
                    await fs.close()
                for arr in arrays:
                    await arr.flush()
                    arr.close()
    trio.run(go)
    return d


def run_cli(capsys, *argv):
    from replfs.tools.cli import main
    rc = main(["fsck", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_cluster_clean_then_damaged_and_repaired(tmp_path, capsys):
    d = make_cluster(tmp_path)
    rc, out, err = run_cli(capsys, d)
    assert rc == 0, out + err
    assert "4 replicas in 2 groups: clean" in out
    rc, out, _ = run_cli(capsys, "--json", d)
    got = json.loads(out)
    assert got["clean"] and set(got["replicas"]) == {"s0", "s1", "s2", "s3"}
    # one replica alone: a cluster replica, so the names from group 0 are unknown
    rc, out, _ = run_cli(capsys, os.path.join(d, "s2"))
    assert rc == 0 and "checked alone" in out
    # a running server holds its array: fsck refuses
    from replfs.raid import open_array
    held = open_array(os.path.join(d, "s3"))
    try:
        rc, out, err = run_cli(capsys, d)
    finally:
        held.close()
    assert rc == 2 and "in use" in err and "looks running" in err

    async def damage(fss, ids):
        await setnode(fss[0], ids["f"], nlink=5)
        await insert(fss[1], ids["d1"], b"ghost", make_ino(0, 200), DT_REG)
    d2 = make_cluster(tmp_path / "b", damage)
    rc, out, _ = run_cli(capsys, d2)
    assert rc == 1
    assert out.count("link count 5, but 1 names") == 2     # s0 and s1
    assert out.count("'ghost'") == 2
    rc, out, _ = run_cli(capsys, "--repair", d2)
    assert rc == 0, out
    assert "s2 (group 1): repaired: removed entry b'ghost'" in out
    rc, out, _ = run_cli(capsys, d2)
    assert rc == 0, out


@pytest.mark.timeout(30)
def test_cli_cluster_with_a_transaction_in_doubt(tmp_path, capsys):
    async def prepare(fss, ids):
        fs = fss[0]              # a participant's prepared rename out of group 0's root
        t = fs.mgr.begin("participant")
        op = Op(fs, t)
        root = await op.inode(ROOT0, "X")
        await directory.remove(op, root, b"f0")
        await op.put(ROOT0, root)
        await t.prepare({"gtid": ["coordinator", 1]})
    d = make_cluster(tmp_path, prepare)
    rc, out, _ = run_cli(capsys, "--repair", d)     # the test's timeout: it must not wait
    assert rc == 1
    assert out.count("1 distributed transaction in doubt: start the cluster") == 2
    assert "group 0 has transactions in doubt" in out
    assert "s2 (group 1): " in out and "checked alone" in out


def test_cli_cluster_whose_replicas_differ(tmp_path, capsys):
    calls = []

    async def behind(fss, ids):          # the second replica pair: s3 has one name more
        calls.append(1)
        if len(calls) == 2:
            await insert(fss[1], ids["d1"], b"extra", ids["f0"], DT_REG)
    d = make_cluster(tmp_path, behind)
    rc, out, _ = run_cli(capsys, "--repair", "--json", d)
    got = json.loads(out)
    assert rc == 1 and not got["clean"]
    assert any("replicas of group 1 differ" in p and "s2: 3, s3: 4" in p
               for p in got["problems"]), got["problems"]
    # nothing is "repaired" on the strength of either replica's names
    assert all(not r["repaired"] for r in got["replicas"].values()), got
