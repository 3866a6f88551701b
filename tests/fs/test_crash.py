"""Crashes of a mounted filesystem: kill -9 of the mount process mid-workload, and named
crash points inside operations, commit, install and checkpoint. Afterwards `replfs fsck`
is clean, every operation is whole or absent, and every fsync'd file is all there."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounthelp import Mount, replfs

from fs_crash_workload import data

pytestmark = pytest.mark.timeout(180)
WORKLOAD = Path(__file__).parent.parent / "fs_crash_workload.py"


def check_after_crash(mnt: Path, journal: Path) -> int:
    lines = journal.read_text().split("\n") if journal.exists() else []
    fsynced = {int(l.split()[1]) for l in lines if l.startswith("fsync")}
    unlinked = {int(l.split()[1]) for l in lines if l.startswith("unlink")}
    d = mnt / "w"
    names = set(os.listdir(d)) if d.exists() else set()
    for i in fsynced:
        if i in unlinked:
            continue
        present = [n for n in ("f%d" % i, "r%d" % i) if n in names]
        assert present, f"fsync'd file {i} is gone"
    for n in names:
        i = int(n[1:])
        assert not ("f%d" % i in names and "r%d" % i in names), f"rename of {i} happened twice"
        content = (d / n).read_bytes()
        assert content in (b"", data(i)), f"{n}: a torn write ({len(content)} bytes)"
        if i in fsynced:
            assert content == data(i), f"{n}: fsync'd data lost"
    return len(fsynced)


@pytest.mark.parametrize("crash", [
    "kill-9",
    "txn.commit.appended:150",
    "txn.log.written:40",
    "txn.log.flushed:40",
    "txn.write.logged:700",
    "fs.write.blocks_written:90",
    "fs.rename.inserted:12",
    "fs.unlink.removed:5",
    "txn.install.before_write:5",
    "txn.checkpoint.logged:2",
    "txn.checkpoint.truncated:2",
    "raid.between_data_and_parity:900",
])
def test_crash_then_recover(tmp_path, crash):
    data_dir, mnt, journal = tmp_path / "data", tmp_path / "mnt", tmp_path / "journal"
    # a small log so that checkpoints and truncation happen within the workload
    replfs("mkfs", data_dir, "--disks", "4", "--size", "32M")
    env = {} if crash == "kill-9" else {"REPLFS_CRASH_AT": crash}
    m = Mount(data_dir, mnt, env=env)
    w = None
    try:
        m.start()
        w = subprocess.Popen([sys.executable, WORKLOAD, mnt, journal, "3000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if crash == "kill-9":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if journal.exists() and journal.read_text().count("fsync") >= 60:
                    break
                time.sleep(0.05)
            m.kill9()
        else:
            rc = m.proc.wait(120)
            assert rc == 77, f"mount exited with {rc}, not at the crash point:\n{m.logtext()[-2000:]}"
            m.kill9()
        w.wait(60)
        assert "done" not in journal.read_text(), "the crash came after the workload ended"
    finally:
        if w is not None and w.poll() is None:
            w.kill()
            w.wait(10)
        m.stop()
    r = replfs("fsck", data_dir, check=False)
    assert r.returncode == 0, f"fsck after crash:\n{r.stdout}\n{r.stderr}"
    m2 = Mount(data_dir, mnt)
    try:
        m2.start()
        n = check_after_crash(mnt, journal)
        assert n > 0
        # the filesystem keeps working after recovery
        (mnt / "after").write_bytes(b"alive")
        assert (mnt / "after").read_bytes() == b"alive"
    finally:
        m2.stop()
    assert replfs("fsck", data_dir, check=False).returncode == 0
