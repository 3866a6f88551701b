"""The commands: init, up --daemon, status (table and --json), fault kill, down."""

import json
import os
import stat
import time

import psutil
import pytest

from mounthelp import force_unmount, is_mounted, replfs

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_init_writes_secret_0600_and_refuses_twice(tmp_path):
    d = tmp_path / "c"
    replfs("init", d, "--size", "16M")
    assert stat.S_IMODE(os.stat(d / "secret").st_mode) == 0o600
    cfg = json.loads((d / "cluster.json").read_text())
    assert cfg["groups"] == {"0": ["s0", "s1"], "1": ["s2", "s3"]} and cfg["disks"] == 4
    assert cfg["placement"] == "spread"
    r = replfs("init", d, check=False)
    assert r.returncode != 0 and "already holds a cluster" in r.stderr
    assert "Traceback" not in r.stderr


def test_up_daemon_status_kill_down(tmp_path):
    d, mnt = tmp_path / "c", tmp_path / "mnt"
    mnt.mkdir()
    replfs("init", d, "--size", "32M")     # (the default size: test_everyday.py)
    try:
        replfs("up", d, mnt, "--daemon")
        assert is_mounted(mnt)
        (mnt / "hello").write_text("world\n")
        st = json.loads(replfs("status", d, "--json").stdout)
        view = st["viewserver"]["groups"]["0"]
        assert view["primary"] and view["backup"] and not view["unprotected"]
        prim = view["primary"]
        assert st["servers"][prim]["role"] == "primary"
        assert st["processes"][prim]["running"]
        table = replfs("status", d).stdout
        assert "protected" in table and prim in table
        replfs("fault", "kill", d, "--server", prim)
        # the mount keeps working; `up` restarts the dead server, which comes back as backup
        (mnt / "after").write_text("kill\n")
        assert (mnt / "hello").read_text() == "world\n"
        deadline = time.monotonic() + 60
        while True:       # status exits non-zero until the group is protected again
            st = json.loads(replfs("status", d, "--json", check=False).stdout)
            v = st["viewserver"]["groups"]["0"]
            if v["primary"] != prim and v["backup"] == prim and v["acked"]:
                break
            assert time.monotonic() < deadline, v
            time.sleep(0.2)
        pids = [st["processes"][n]["pid"] for n in st["processes"] if st["processes"][n]["pid"]]
        replfs("down", d)
        assert not is_mounted(mnt)
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    finally:
        force_unmount(mnt)
        replfs("down", d, check=False)


def test_whole_cluster_restart_after_running_unprotected_keeps_the_newest_state(tmp_path):
    d, mnt = tmp_path / "c", tmp_path / "mnt"
    mnt.mkdir()
    replfs("init", d, "--size", "32M")
    try:
        replfs("up", d, mnt, "--daemon", "--no-restart")
        (mnt / "a").write_text("1\n")
        st = json.loads(replfs("status", d, "--json").stdout)
        backup = st["viewserver"]["groups"]["0"]["backup"]
        replfs("fault", "kill", d, "--server", backup)
        with open(mnt / "a", "a") as f:      # the primary goes on alone
            f.write("2\n")
        replfs("down", d)
        for _ in range(3):                   # whichever server pings first, a must hold 1, 2
            replfs("up", d, mnt, "--daemon", "--no-restart")
            assert (mnt / "a").read_text() == "1\n2\n"
            replfs("down", d)
    finally:
        force_unmount(mnt)
        replfs("down", d, check=False)
