"""Many processes working in one directory and on one file at once, through a real
mount; the mount records its transactions' history and it must be conflict-serializable."""

import os
import subprocess
import sys
import textwrap

import pytest

from mounthelp import Mount, replfs
from replfs.txn import HistoryRecorder, check_serializable

pytestmark = pytest.mark.timeout(180)

WORKER = textwrap.dedent("""
    import os, sys
    d, k = sys.argv[1], int(sys.argv[2])
    shared = os.path.join(d, "shared")
    fd = os.open(shared, os.O_RDWR | os.O_CREAT, 0o644)
    for i in range(40):
        name = os.path.join(d, "p%d-%d" % (k, i))
        with open(name, "wb") as f:
            f.write(b"%d-%d" % (k, i) * 100)
        os.pwrite(fd, b"%02d" % k * 256, (k * 40 + i) * 1024)   # disjoint ranges
        os.write(os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
                 b"%d %d\\n" % (k, i))
        if i % 4 == 3:
            os.rename(name, name + ".renamed")
            name += ".renamed"
        if i % 10 == 9:
            os.unlink(name)
        os.listdir(d)
    os.close(fd)
""")


def test_many_processes_one_directory_one_file(tmp_path):
    data, mnt, hist = tmp_path / "data", tmp_path / "mnt", tmp_path / "history"
    replfs("mkfs", data, "--disks", "4", "--size", "32M")
    m = Mount(data, mnt, env={"REPLFS_HISTORY": str(hist)})
    nproc = 8
    try:
        m.start()
        d = mnt / "work"
        d.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, d, str(k)]) for k in range(nproc)]
        try:
            assert [p.wait(120) for p in procs] == [0] * nproc
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        names = set(os.listdir(d))
        for k in range(nproc):
            for i in range(40):
                n = "p%d-%d" % (k, i)
                if i % 10 == 9:
                    assert n not in names and n + ".renamed" not in names
                elif i % 4 == 3:
                    assert n + ".renamed" in names and n not in names
                    assert (d / (n + ".renamed")).read_bytes() == b"%d-%d" % (k, i) * 100
                else:
                    assert (d / n).read_bytes() == b"%d-%d" % (k, i) * 100
        shared = (d / "shared").read_bytes()
        for k in range(nproc):
            for i in range(40):
                off = (k * 40 + i) * 1024
                assert shared[off:off + 512] == b"%02d" % k * 256
        lines = (d / "log").read_text().splitlines()
        assert sorted(lines) == sorted("%d %d" % (k, i) for k in range(nproc) for i in range(40))
    finally:
        m.stop()
    h = HistoryRecorder.load(hist)
    assert len(h.committed) > 1000
    res = check_serializable(h)
    assert res.serializable, f"not conflict-serializable: cycle {res.cycle}"
    assert replfs("fsck", data, check=False).returncode == 0
