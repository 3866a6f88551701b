"""What an acknowledged update survives (README, "Durability"): with the default
`durability = "written"`, an operation that returned is written (in the image files) on
the primary and on its backup, so `kill -9` of both servers of a group within
milliseconds, right after a burst of acknowledged operations, loses none of them --
whichever replica comes back first, and after both come back."""

import os
import signal

import pytest
import trio

from clusterhelp import compare_replicas

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.placement("parent")]

N = 240


def burst(mnt):
    """A burst of acknowledged operations in group 0 (placement "parent"): creates with
    data, appends, renames, unlinks, mkdirs. Returns the tree it leaves: {name: bytes}
    for the files of d/, and the names of its subdirectories."""
    d = mnt / "d"
    d.mkdir()
    files, dirs = {}, set()
    with open(d / "appends", "ab") as log:
        for i in range(N):
            data = f"file {i}\n".encode() * (1 + i % 5)
            (d / f"f{i}").write_bytes(data)
            files[f"f{i}"] = data
            log.write(f"op {i}\n".encode())
            log.flush()
            if i % 10 == 0:
                os.rename(d / f"f{i}", d / f"g{i}")
                files[f"g{i}"] = files.pop(f"f{i}")
            elif i % 7 == 0:
                os.unlink(d / f"f{i}")
                del files[f"f{i}"]
            if i % 25 == 0:
                os.mkdir(d / f"dir{i}")
                dirs.add(f"dir{i}")
    files["appends"] = b"".join(f"op {i}\n".encode() for i in range(N))
    return files, dirs


def replica_tree(cfg, server):
    """Open `server`'s array as a restarted server would (recovery included) and read d/."""
    from replfs.fs.mkfs import open_fs
    from replfs.raid import open_array

    async def go():
        array = open_array(cfg.server_dir(server))
        fs = await open_fs(array, reclaim=False)
        try:
            d = await fs.lookup(fs.root_ino, b"d")
            files, dirs, start = {}, set(), 0
            while True:
                batch = await fs.readdir(d.ino, start)
                if not batch:
                    break
                for name, attr, nxt in batch:
                    if attr.mode & 0o170000 == 0o040000:
                        dirs.add(name.decode())
                    else:
                        files[name.decode()] = await fs.read(attr.ino, 0, attr.size)
                    start = nxt
            return files, dirs
        finally:
            await fs.close()
            array.close()
    return trio.run(go)


def mount_tree(mnt):
    d = mnt / "d"
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    dirs = {p.name for p in d.iterdir() if p.is_dir()}
    return files, dirs


def test_kill_both_replicas_right_after_a_burst_loses_nothing(running):
    cfg, cluster = running.cfg, running.cluster
    assert cfg.durability == "written"
    servers = cfg.group_servers(0)
    expected = burst(running.mnt)
    # both servers of the group, within milliseconds of the last acknowledgement (well
    # inside the flush-behind: most of the burst is written, not forced, on either)
    for s in servers:
        cluster.signal(s, signal.SIGKILL)
    for s in servers:
        cluster.procs[s].wait(10)
    # each replica alone holds every acknowledged operation: whichever comes back first
    for s in servers:
        assert replica_tree(cfg, s) == expected, f"{s} lost acknowledged operations"
    for s in servers:
        cluster.start_server(s)
    cluster.wait_protected(timeout=90, group=0)
    assert mount_tree(running.mnt) == expected
    running.unmount()
    cluster.stop_all()
    diff, compared = compare_replicas(cfg)
    assert compared > 0 and not any(diff.values()), diff


def test_forced_durability_forces_every_operation(tmp_path):
    """`replfs init --durability forced`: no update is answered before both replicas
    forced it -- neither log ever holds a written but unforced commit once the burst
    returned, and the primary wrote nothing without forcing it."""
    from clusterhelp import Running
    running = Running(tmp_path / "cluster", tmp_path / "mnt", placement="parent",
                      durability="forced")
    try:
        running.start()
        assert running.cfg.durability == "forced"
        for i in range(30):
            (running.mnt / f"f{i}").write_bytes(b"forced %d\n" % i)
        st = running.cluster.status()["servers"]
        for s in running.cfg.group_servers(0):
            txn = st[s]["txn"]
            assert txn["durable_lsn"] == txn["written_lsn"], (s, txn)
        primary = st[running.primary()]["txn"]
        assert primary["log_writes"] == 0 and primary["lazy_commits"] == 0, primary
    finally:
        running.stop()
