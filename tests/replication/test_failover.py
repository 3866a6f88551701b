"""Kill -9 the primary in the middle of a shell workload on the mount."""

import os
import signal
import subprocess
import time

import pytest

from clusterhelp import compare_replicas, followers

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

WORKLOAD = r"""
mkdir -p w/sub
for i in $(seq 1 N); do
  echo "append $i" >> w/appends
  printf 'file %s\n' "$i" > w/sub/f$i
  if [ $((i % 10)) -eq 0 ]; then mv w/sub/f$i w/moved$i; mkdir w/dir$i;
  elif [ $((i % 7)) -eq 0 ]; then rm w/sub/f$i; fi
done
echo finished
"""


def expected(n):
    files = {}
    for i in range(1, n + 1):
        if i % 10 == 0:
            files[f"w/moved{i}"] = f"file {i}\n"
        elif i % 7 != 0:
            files[f"w/sub/f{i}"] = f"file {i}\n"
    return files


def check_workload(mnt, n):
    lines = (mnt / "w/appends").read_text().splitlines()
    assert lines == [f"append {i}" for i in range(1, n + 1)]     # exactly once each, in order
    for rel, text in expected(n).items():
        assert (mnt / rel).read_text() == text, rel
    names = sorted(p.name for p in (mnt / "w/sub").iterdir())
    assert names == sorted(f"f{i}" for i in range(1, n + 1) if i % 10 and i % 7)
    dirs = sorted(p.name for p in (mnt / "w").iterdir() if p.name.startswith("dir"))
    assert dirs == sorted(f"dir{i}" for i in range(10, n + 1, 10))


def _appended(mnt) -> int:
    try:
        return (mnt / "w/appends").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_with_fault(running, n, fault):
    """Run the workload and inject `fault` once a fifth of it is done (a condition,
    not a time: the workload's speed is the filesystem's)."""
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", WORKLOAD.replace("N", str(n))],
                            cwd=running.mnt, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while _appended(running.mnt) < n // 5 and proc.poll() is None:
            assert time.monotonic() < deadline, "the workload made no progress for 60 s"
            time.sleep(0.01)
        assert proc.poll() is None, "workload finished before the fault: make it longer"
        fault()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"workload failed:\n{out}\n{err}"
    assert "finished" in out


def test_kill_primary_during_shell_workload(running):
    n = 150
    old = running.primary()
    run_with_fault(running, n, lambda: running.cluster.signal(old, signal.SIGKILL))
    assert running.primary() != old
    check_workload(running.mnt, n)
    # spread placement puts w/ in group 0 and w/sub/ in group 1: every `mv w/sub/f w/`
    # was a two-phase commit (coordinated by group 1), and group 0, whose primary was
    # killed, took part in it
    assert [os.stat(running.mnt / d).st_ino >> 48 for d in ("w", "w/sub")] == [0, 1]
    assert "primary is now" in running.log("mount")
    # the killed server comes back, is brought up to date, and the replicas agree
    running.cluster.start_server(old)
    running.cluster.wait_protected(timeout=60)
    check_workload(running.mnt, n)
    running.unmount()
    running.cluster.stop_all()
    diff, compared = compare_replicas(running.cfg)
    assert compared > 500
    assert diff == {s: [] for s in followers(running.cfg)}


def test_sigstop_primary_during_shell_workload(running):
    n = 100
    old = running.primary()
    pid = running.cluster.pid(old)
    try:
        run_with_fault(running, n, lambda: running.cluster.signal(old, signal.SIGSTOP))
        assert running.primary() != old
        check_workload(running.mnt, n)
    finally:
        running.cluster.signal(old, signal.SIGCONT)
    del pid
    # the frozen primary wakes up in a world with a newer view: it must not serve
    running.cluster.wait_protected(timeout=60)
    check_workload(running.mnt, n)
