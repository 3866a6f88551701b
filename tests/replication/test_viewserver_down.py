"""The view server killed with kill -9 while two writers work (issue 11): the mount
keeps serving, reads and writes, long after the primaries' view-server lease ran out --
their backups renew it -- and when a view server runs again the cluster carries on and
still fails over."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clusterhelp import done_after, wait_for

from replfs.replication.config import VIEWSERVER

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

WRITER = textwrap.dedent("""
    import os, sys, time
    d, progress, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(d, exist_ok=True)
    i = 0
    with open(progress, "a", buffering=1) as log:
        while not os.path.exists(stop):
            data = (b"%d " % i) * 500
            with open(os.path.join(d, "f%d" % i), "wb") as f:
                f.write(data)
            with open(os.path.join(d, "f%d" % i), "rb") as f:
                assert f.read() == data, i
            os.rename(os.path.join(d, "f%d" % i), os.path.join(d, "g%d" % i))
            log.write("%d %.3f\\n" % (i, time.monotonic()))
            i += 1
""")


def test_mount_serves_on_while_the_view_server_is_dead(running, tmp_path):
    c = running.cluster
    lease = c.cfg.dead_pings * c.cfg.ping_interval
    stop = tmp_path / "stop"
    progress = [tmp_path / "p0", tmp_path / "p1"]
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(running.mnt / f"w{k}"),
                                 str(progress[k]), str(stop)]) for k in range(2)]
    try:
        wait_for(lambda: all(done_after(p, 0) >= 5 for p in progress), 60, "writers going")
        os.kill(c.pid(VIEWSERVER), signal.SIGKILL)
        c.procs[VIEWSERVER].wait(10)
        killed = time.monotonic()
        # the writers go on well past the view-server lease (and the 60 s request
        # deadline would have failed them by now had the mount stopped)
        wait_for(lambda: all(done_after(p, killed + 6 * lease) >= 10 for p in progress),
                 90, "writers working on without a view server")
        for k in range(2):
            assert writers[k].poll() is None, f"writer {k} failed"
        assert (running.mnt / "w0" / "g0").read_bytes() == b"0 " * 500
        # a view server again: the cluster carries on, protected
        c.start_viewserver()
        c.wait_protected(timeout=60)
        back = time.monotonic()
        wait_for(lambda: all(done_after(p, back) >= 5 for p in progress), 60,
                 "writers after the view server's return")
        # and it still fails over: the primary of group 0 killed
        old = running.primary(0)
        c.signal(old)
        c.wait_primary(not_=old, timeout=30)
        failed_over = time.monotonic()
        wait_for(lambda: all(done_after(p, failed_over) >= 5 for p in progress), 60,
                 "writers after the failover")
    finally:
        stop.touch()
        for w in writers:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(10)
    assert [w.returncode for w in writers] == [0, 0]
    for k in range(2):
        n = sum(1 for _ in progress[k].read_text().splitlines())
        names = set(os.listdir(running.mnt / f"w{k}"))
        assert {f"g{i}" for i in range(n)} <= names
