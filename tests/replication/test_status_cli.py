"""`replfs status`, `up` and `down` as a user meets them: the overall line and its exit
code, counters that agree with `replfs raid status`, a stopped cluster, `down` with
nothing running, a server started by hand, `kill -9` of `up` itself, a server that keeps
dying, and `up --daemon` failing. Real clusters, real processes, real kill -9."""

import functools
import json
import os
import signal
import subprocess

import psutil
import pytest

import clusterhelp
from mounthelp import REPLFS, force_unmount, is_mounted, replfs
from replfs.raid import DEFAULT_CHECKSUM_CACHE
from replfs.tools.cluster import find_processes

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SIZE = "32M"


wait_for = functools.partial(clusterhelp.wait_for, poll=0.2)   # (each poll runs `status`)


@pytest.fixture
def cdir(tmp_path):
    """A fresh cluster directory and mount point; afterwards nothing of it runs or is
    mounted, whatever the test did."""
    d, mnt = tmp_path / "c", tmp_path / "mnt"
    mnt.mkdir()
    replfs("init", d, "--size", SIZE)
    try:
        yield d, mnt
    finally:
        replfs("down", d, check=False, timeout=120)
        for f in find_processes(str(d)):
            try:
                os.kill(f.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        force_unmount(mnt)


def status(d, *extra):
    return replfs("status", d, *extra, check=False)


def status_json(d) -> tuple[int, dict]:
    r = status(d, "--json")
    return r.returncode, json.loads(r.stdout)


def one_line(r: subprocess.CompletedProcess) -> str:
    text = (r.stdout + r.stderr).strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_stopped_cluster_says_not_running_and_down_says_nothing_ran(cdir):
    d, _ = cdir
    r = status(d)
    assert r.returncode == 5
    assert one_line(r) == f"{d}: not running (start it with `replfs up {d} MOUNTPOINT`)"
    assert status_json(d)[1]["state"] == "not running"
    r = replfs("down", d)
    assert one_line(r) == f"replfs: nothing was running in {d}"


def test_healthy_then_unprotected_in_80_columns(cdir):
    d, mnt = cdir
    replfs("up", d, mnt, "--daemon", "--no-restart")
    r = status(d)
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    assert lines[0] == f"{d}: healthy"
    text = " ".join(r.stdout.split())
    assert f"mounted on {mnt} (pid " in text and " available of " in text
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    assert "undone" in r.stdout and "undone: transactions rolled back" in " ".join(lines)
    rc, st = status_json(d)
    backup = st["viewserver"]["groups"]["1"]["backup"]
    replfs("fault", "kill", d, "--server", backup)
    r = wait_for(lambda: (lambda r: r if r.returncode == 3 else None)(status(d)), 30,
                 "status unprotected")
    lines = r.stdout.splitlines()
    assert lines[0] == f"{d}: unprotected"
    assert any("group 1 has no backup" in ln for ln in lines)
    assert any(ln.strip() == f"{backup} is not running" for ln in lines)
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)


def test_checksum_counters_agree_with_raid_status(cdir):
    d, mnt = cdir
    replfs("up", d, mnt, "--daemon")
    for i in range(20):
        (mnt / f"f{i}").write_bytes(os.urandom(200_000))
    replfs("down", d)
    replfs("fault", "corrupt", d / "s0" / "disk1.img", "--count", "300", "--seed", "7",
           "--area", "data")
    replfs("up", d, mnt, "--daemon")
    for i in range(20):                      # cold caches: the reads meet the damage
        assert len((mnt / f"f{i}").read_bytes()) == 200_000
    (mnt / "g").write_text("a write makes the array flush its counters\n")
    os.sync()

    def raid_counts():
        raid = json.loads(replfs("raid", "status", d / "s0", "--json").stdout)
        return [x["cksum_errors"] for x in raid["disks"]]

    def agreed():
        # the repairs reach the superblocks over a few flushes: both commands must
        # report the same counts while they stand still (read before and after)
        per_disk = raid_counts()
        if not sum(per_disk):
            return None
        st = status_json(d)[1]
        row = next(ln for ln in status(d).stdout.splitlines() if ln.startswith("s0 "))
        if raid_counts() != per_disk:
            return None
        return per_disk, st, row
    per_disk, st, row = wait_for(agreed, 60, "repairs counted in the superblocks")
    assert [x["cksum_errors"] for x in st["arrays"]["s0"]["disks"]] == per_disk
    assert row.split()[7] == str(sum(per_disk)), row     # the "fixed" column
    # beside its memory, each server shows its checksum cache: within its limit
    cache = st["servers"]["s0"]["array"]["checksum_cache"]
    assert st["servers"]["s0"]["rss"] > 0 and cache["misses"] > 0, cache
    assert 0 < cache["pages"] * 4096 <= cache["limit_bytes"] == DEFAULT_CHECKSUM_CACHE, cache


def test_kill9_of_up_then_up_cleans_up_and_runs(cdir):
    d, mnt = cdir
    replfs("up", d, mnt, "--daemon")
    old = {f.name: f.pid for f in find_processes(str(d))}
    os.kill(old["up"], signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(old["up"]), 10, "up gone")
    r = status(d)
    assert r.returncode == 1 and r.stdout.splitlines()[0] == f"{d}: degraded"
    assert f"`replfs up` (pid {old['up']}) was killed" in " ".join(r.stdout.split())
    r = replfs("up", d, mnt, "--daemon")
    first = r.stdout.splitlines()[0]
    assert f"a `replfs up` of {d} (pid {old['up']}) was killed; cleaned up after it" in first
    assert "s0 (pid" in first and "mount (pid" in first
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for n, p in old.items() if n != "up")
    assert is_mounted(mnt) and status(d).returncode == 0
    (mnt / "x").write_text("x\n")


def test_kill9_of_up_and_its_mount_then_down_cleans_up(cdir):
    d, mnt = cdir
    replfs("up", d, mnt, "--daemon")
    procs = {f.name: f.pid for f in find_processes(str(d))}
    os.kill(procs["up"], signal.SIGKILL)
    os.kill(procs["mount"], signal.SIGKILL)       # a dead FUSE mount stays behind
    wait_for(lambda: not psutil.pid_exists(procs["mount"]), 10, "mount gone")
    assert is_mounted(mnt)
    r = replfs("down", d)
    line = one_line(r)
    assert line.startswith(f"replfs: no `replfs up` of {d} was running (it was killed); "
                           f"stopped "), line
    assert f"unmounted {mnt}" in line
    assert not is_mounted(mnt) and not find_processes(str(d))
    assert not [n for n in os.listdir(d / "run") if n.endswith((".pid", ".json"))]
    assert one_line(replfs("down", d)) == f"replfs: nothing was running in {d}"


def test_server_started_by_hand_up_refuses_and_down_stops_it(cdir):
    d, mnt = cdir
    with open(d.parent / "hand.log", "wb") as log:   # a relative path, from another cwd
        hand = subprocess.Popen([*REPLFS, "server", "c", "--name", "s2"], cwd=d.parent,
                                stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: any(f.pid == hand.pid for f in find_processes(str(d))), 10,
                 "the hand-started server found")
        r = replfs("up", d, mnt, "--daemon", check=False)
        assert r.returncode != 0
        assert one_line(r) == (f"replfs up: s2 (pid {hand.pid}) of the cluster in {d} already "
                               f"runs, not started by `replfs up`; stop it (`replfs down {d}` "
                               f"does) and try again")
        assert not is_mounted(mnt)
        assert [f.pid for f in find_processes(str(d))] == [hand.pid]   # nothing started
        r = replfs("down", d)
        assert one_line(r) == (f"replfs: no `replfs up` of {d} was running; stopped s2 "
                               f"(pid {hand.pid})")
        assert hand.wait(10) is not None
    finally:
        if hand.poll() is None:
            hand.kill()
            hand.wait(10)


def test_a_server_that_keeps_dying_is_given_up_on_with_the_reason(cdir):
    d, mnt = cdir
    replfs("up", d, mnt, "--daemon")
    s3 = next(f.pid for f in find_processes(str(d)) if f.name == "s3")
    for k in (0, 1):                      # two disks gone: the array cannot be assembled
        os.rename(d / "s3" / f"disk{k}.img", d / "s3" / f"disk{k}.away")
    os.kill(s3, signal.SIGKILL)

    def given_up():
        rc, st = status_json(d)
        return (rc, st) if "s3" in (st.get("up") or {}).get("given_up", {}) else None
    rc, st = wait_for(given_up, 90, "up giving up on s3")
    assert rc == 3                         # group 1 runs on one replica
    assert st["up"]["restarts"]["s3"] == 4
    why = st["up"]["given_up"]["s3"]
    assert why.startswith("gave up after 4 restarts: it exited with code"), why
    text = " ".join(status(d).stdout.split())
    assert f"s3: `replfs up` {why}" in text
    row = next(ln for ln in status(d).stdout.splitlines() if ln.startswith("s3 "))
    assert "gave up" in row
    assert is_mounted(mnt)                 # the rest goes on
    (mnt / "still").write_text("works\n")


def test_up_daemon_failing_says_why_in_one_line(cdir):
    d, mnt = cdir
    for k in (0, 1):
        os.rename(d / "s1" / f"disk{k}.img", d / "s1" / f"disk{k}.away")
    r = replfs("up", d, mnt, "--daemon", check=False, timeout=150)
    assert r.returncode != 0
    line = one_line(r)
    assert line.startswith("replfs up: s1 exited with code "), line
    assert line.endswith(f"(log {d}/logs/s1.log)"), line
    assert not is_mounted(mnt) and not find_processes(str(d))
