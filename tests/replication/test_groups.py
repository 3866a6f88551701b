"""Two replica groups: the configuration and placement rule, the client's routing (to the
group of an operation's inode, foreign inodes read from their own group, statfs summed),
and a real cluster whose two groups both come up protected and serve."""

import errno
import json
import os
import signal
import stat

import pytest
import trio

from replfs.errors import ReplfsError
from replfs.fs.core import Attr
from replfs.fs.errors import FsError, ForeignInode
from replfs.fs.layout import ROOT_SLOT, ino_group, make_ino
from replfs.replication.client import RemoteFS
from replfs.replication.config import CLIENT, VIEWSERVER, ClusterConfig, place_by_name

ROOT0, ROOT1 = make_ino(0, ROOT_SLOT), make_ino(1, ROOT_SLOT)


# ---------------------------------------------------------------- configuration
def test_config_two_groups_addresses_and_placement(tmp_path):
    cfg = ClusterConfig.create(tmp_path / "c", groups=2, replicas=2)
    assert cfg.groups == {0: ["s0", "s1"], 1: ["s2", "s3"]} and cfg.group_count == 2
    assert [cfg.group_of(s) for s in cfg.servers] == [0, 0, 1, 1]
    assert set(cfg.ports) == {VIEWSERVER, *cfg.servers}
    assert len(set(cfg.ports.values())) == len(cfg.ports)
    for s in [VIEWSERVER, *cfg.servers]:
        # every node dials another at its own port; the address names it (for the faults)
        addr = cfg.addr(CLIENT, s)
        assert addr == ("127.0.0.1", cfg.ports[s]) == cfg.direct(s) and addr.node == s
    assert cfg.placement == "spread" and ClusterConfig.load(cfg.dir).placement == "spread"

    three = ClusterConfig.create(tmp_path / "d", groups=3, replicas=3, placement="parent")
    assert three.groups[2] == ["s6", "s7", "s8"]
    assert ClusterConfig.load(three.dir).placement == "parent"
    with pytest.raises(ReplfsError, match="placement"):
        ClusterConfig.create(tmp_path / "e", groups=2, placement="2")


def test_config_of_the_fault_proxy_days_still_loads(tmp_path):
    cfg = ClusterConfig.create(tmp_path / "c", groups=1)
    path = tmp_path / "c" / "cluster.json"
    d = json.loads(path.read_text())
    d.update(proxy=True, routes={f"{CLIENT}>s0": 12345})
    path.write_text(json.dumps(d))
    old = ClusterConfig.load(cfg.dir)
    assert old.ports == cfg.ports and old.addr(CLIENT, "s0") == cfg.direct("s0")
    old.save()
    assert "routes" not in json.loads(path.read_text())


def test_config_without_placement_loads_as_spread(tmp_path):
    cfg = ClusterConfig.create(tmp_path / "c", groups=1)
    path = tmp_path / "c" / "cluster.json"
    d = json.loads(path.read_text())
    del d["placement"]
    path.write_text(json.dumps(d))
    old = ClusterConfig.load(cfg.dir)
    assert old.placement == "spread" and old.groups == {0: ["s0", "s1"]}


def test_place_dir(tmp_path):
    cfg = ClusterConfig.create(tmp_path / "c", groups=2)
    names = [f"d{i}".encode() for i in range(64)]
    spread = [cfg.place_dir(ROOT0, n) for n in names]
    assert set(spread) == {0, 1}                              # both groups get some
    assert spread == [place_by_name(n, 2) for n in names]
    assert [cfg.place_dir(ROOT1, n) for n in names] == spread    # the name decides
    cfg.placement = "parent"
    assert {cfg.place_dir(ROOT0, n) for n in names} == {0}
    assert {cfg.place_dir(make_ino(1, 77), n) for n in names} == {1}
    cfg.placement = "1"
    assert {cfg.place_dir(ROOT0, n) for n in names} == {1}


# ---------------------------------------------------------------- client routing
def attr(ino, mode=stat.S_IFREG | 0o644):
    return Attr(**{**{f: 0 for f in Attr.__dataclass_fields__}, "ino": ino, "mode": mode})


class FakeGroups(RemoteFS):
    """A RemoteFS whose groups answer from tables instead of servers."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []
        self.inodes = {}            # ino -> Attr, each served by its own group only
        self.dirs = {}              # dir ino -> [(name, child ino)]
        self.entry_limit = 128

    async def call_group(self, group, method, *args, **kwargs):
        self.calls.append((group, method))
        if method == "statfs":
            return dict(bsize=4096, frsize=4096, blocks=100 * (group + 1), bfree=10, bavail=10,
                        files=50, ffree=5, favail=5, namemax=255)
        if method == "fsync":
            return None
        ino = args[1] if method == "link" else args[0]
        assert ino_group(ino) == group, (method, args, group)
        if method == "getattr":
            if ino not in self.inodes:
                raise FsError(errno.ENOENT, "gone")
            return self.inodes[ino]
        if method == "lookup":
            for name, child in self.dirs[ino]:
                if name == args[1]:
                    if ino_group(child) != group:
                        raise ForeignInode(child)
                    return self.inodes[child]
            raise FsError(errno.ENOENT, "no such name")
        if method == "readdir":
            start, limit = args[1], min(args[2], self.entry_limit)
            ents = self.dirs[ino][start:start + limit]
            return [[n, c if ino_group(c) != group else self.inodes[c], start + i + 1]
                    for i, (n, c) in enumerate(ents)]
        return method


@pytest.fixture
def fake(tmp_path):
    cfg = ClusterConfig.create(tmp_path / "c", groups=2)
    f = FakeGroups(cfg)
    a0, a1, b1 = make_ino(0, 10), make_ino(1, 10), make_ino(1, 11)
    for ino in (ROOT0, a0, a1, b1):
        f.inodes[ino] = attr(ino)
    f.dirs[ROOT0] = [(b"a0", a0), (b"a1", a1), (b"b1", b1)]
    return f


async def test_client_routes_by_the_inode_group(fake):
    a1 = make_ino(1, 10)
    for coro, group in [(fake.getattr(a1), 1), (fake.setattr(a1, size=3), 1),
                        (fake.write(a1, 0, b"x"), 1), (fake.read(ROOT0, 0, 1), 0),
                        (fake.create(a1, b"n", 0o644, 0, 0), 1),
                        (fake.mkdir(ROOT0, b"n", 0o755, 0, 0), 0),
                        (fake.rename(a1, b"x", ROOT0, b"y"), 1),
                        (fake.unlink(ROOT0, b"y"), 0), (fake.forget(a1), 1),
                        (fake.link(ROOT0, a1, b"l"), 1),          # link goes to the parent's group
                        (fake.fsync(a1), 1)]:
        fake.calls.clear()
        await coro
        assert fake.calls[0][0] == group, fake.calls
    fake.calls.clear()
    await fake.fsync()
    assert sorted(fake.calls) == [(0, "fsync"), (1, "fsync")]


async def test_client_lookup_and_readdir_read_foreign_inodes_from_their_group(fake):
    a1 = make_ino(1, 10)
    got = await fake.lookup(ROOT0, b"a1")
    assert got.ino == a1
    assert fake.calls[-2:] == [(0, "lookup"), (1, "getattr")]
    assert (await fake.lookup(ROOT0, b"a0")).ino == make_ino(0, 10)
    with pytest.raises(FsError) as exc:
        await fake.lookup(ROOT0, b"nothing")
    assert exc.value.errno == errno.ENOENT

    entries = await fake.readdir(ROOT0, 0)
    assert [(n, a.ino, nxt) for n, a, nxt in entries] == [
        (b"a0", make_ino(0, 10), 1), (b"a1", a1, 2), (b"b1", make_ino(1, 11), 3)]
    assert all(isinstance(a, Attr) for _, a, _ in entries)

    # a foreign inode that vanished is left out; a batch that vanished entirely is not
    # the end of the directory
    del fake.inodes[a1]
    assert [n for n, _, _ in await fake.readdir(ROOT0, 0)] == [b"a0", b"b1"]
    fake.entry_limit = 1
    assert [(n, nxt) for n, _, nxt in await fake.readdir(ROOT0, 1)] == [(b"b1", 3)]
    assert await fake.readdir(ROOT0, 3) == []


async def test_client_statfs_sums_the_groups(fake):
    st = await fake.statfs()
    assert st["blocks"] == 100 + 200 and st["bfree"] == 20 and st["files"] == 100
    assert st["ffree"] == 10 and st["bsize"] == 4096 and st["namemax"] == 255


# ---------------------------------------------------------------- a real cluster
def with_client(cfg, fn, name=CLIENT):
    async def go():
        rfs = RemoteFS(cfg, deadline=30, name=name)
        async with trio.open_nursery() as nursery:
            await nursery.start(rfs.run)
            try:
                return await fn(rfs)
            finally:
                await rfs.aclose()
                nursery.cancel_scope.cancel()
    return trio.run(go)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_two_groups_come_up_protected_and_serve(running):
    cfg = running.cfg
    st = running.cluster.status()
    views = st["viewserver"]["groups"]
    for g, servers in cfg.groups.items():
        v = views[str(g)]
        assert v["acked"] and not v["unprotected"]
        assert {v["primary"], v["backup"]} == set(servers)
    for s in cfg.servers:
        assert st["servers"][s]["group"] == cfg.group_of(s)

    # files created in a directory carry that directory's group
    (running.mnt / "f0").write_text("zero\n")
    assert ino_group(os.stat(running.mnt / "f0").st_ino) == 0

    async def work(rfs):
        d1 = await rfs.call_group(1, "mkdir", ROOT1, b"in-group-1", 0o755, 0, 0)
        f1 = await rfs.create(d1.ino, b"f", 0o644, 0, 0)
        assert ino_group(d1.ino) == 1 and ino_group(f1.ino) == 1
        await rfs.write(f1.ino, 0, b"one\n")
        await rfs.fsync()
        assert await rfs.read(f1.ino, 0, 100) == b"one\n"
        assert [n for n, a, _ in await rfs.readdir(d1.ino, 0)] == [b"f"]
        assert (await rfs.lookup(d1.ino, b"f")).ino == f1.ino
        per = [await rfs.call_group(g, "statfs") for g in (0, 1)]
        return per, await rfs.statfs(), f1.ino
    per, total, _ = with_client(cfg, work)
    assert total["blocks"] == per[0]["blocks"] + per[1]["blocks"]
    assert total["files"] == per[0]["files"] + per[1]["files"]
    vfs = os.statvfs(running.mnt)
    assert vfs.f_blocks == total["blocks"] and vfs.f_files == total["files"]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_client_follows_each_groups_failover(running):
    """Group 1's primary dies: the client finds group 1's new primary, and group 0 is
    not disturbed. A server's own RemoteFS (named after it) reaches the other group."""
    cfg = running.cfg

    async def make(rfs):
        d1 = await rfs.call_group(1, "mkdir", ROOT1, b"dir", 0o755, 0, 0)
        f1 = await rfs.create(d1.ino, b"f", 0o644, 0, 0)
        await rfs.write(f1.ino, 0, b"before\n")
        return f1.ino
    f1 = with_client(cfg, make, name="s0")          # named s0, as 2PC will
    v0, v1 = running.view(0), running.view(1)
    running.cluster.signal(v1["primary"], signal.SIGKILL)
    running.cluster.wait_primary(group=1, not_=v1["primary"], timeout=30)

    async def after(rfs):
        await rfs.write(f1, 7, b"after\n")
        return await rfs.read(f1, 0, 100), rfs.stats
    data, stats = with_client(cfg, after)
    assert data == b"before\nafter\n"
    assert running.primary(1) == v1["backup"]
    assert running.view(0)["view"] == v0["view"]
    running.sh("echo still > g0")
    assert (running.mnt / "g0").read_text() == "still\n"


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_entries_of_the_other_group_through_the_mount(running):
    """With "spread" placement, some top-level directories are in group 1: the mount
    looks them up, stats and lists them (their attributes come from group 1)."""
    cfg, mnt = running.cfg, running.mnt
    names = [f"top{i}" for i in range(8)]
    for n in names:
        (mnt / n).mkdir()
        (mnt / n / "file").write_text(n)
    groups = {n: cfg.place_dir(ROOT0, n.encode()) for n in names}
    assert set(groups.values()) == {0, 1}
    for n in names:
        st = os.stat(mnt / n)
        assert stat.S_ISDIR(st.st_mode) and ino_group(st.st_ino) == groups[n], n
        assert ino_group(os.stat(mnt / n / "file").st_ino) == groups[n]
        assert os.stat(mnt / n / "..").st_ino == 1
        assert (mnt / n / "file").read_text() == n
        assert os.listdir(mnt / n) == ["file"]
    listing = {e.name: e for e in os.scandir(mnt)}
    assert set(names) <= set(listing)
    for n in names:
        assert listing[n].inode() == os.stat(mnt / n).st_ino
        assert listing[n].is_dir()
    # a directory of group 0 inside one of group 1
    one = next(n for n in names if groups[n] == 1)
    sub = next(f"sub{i}" for i in range(64) if cfg.place_dir(ROOT0, f"sub{i}".encode()) == 0)
    (mnt / one / sub).mkdir()
    assert ino_group(os.stat(mnt / one / sub).st_ino) == 0
    assert os.stat(mnt / one / sub / "..").st_ino == os.stat(mnt / one).st_ino
    assert sorted(os.listdir(mnt / one)) == sorted(["file", sub])
