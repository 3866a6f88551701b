"""Both servers of a group killed with kill -9 within milliseconds, then restarted (issue
11): the group comes back with the replica holding the newest state as primary, gets a
backup again, keeps what was written before, and fails over again later."""

import os
import signal

import pytest

from clusterhelp import compare_replicas, followers
from replfs.tools.cluster import protected

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

GROUP = 0


def view(st: dict) -> dict:
    return st["viewserver"]["groups"][str(GROUP)]


def serving_after(num: int):
    """A predicate: the group has a primary, serving, in an acknowledged view after `num`."""
    def ok(st):
        v = st.get("viewserver", {}).get("groups", {}).get(str(GROUP))
        return bool(v and v["view"] > num and v["primary"] and v["acked"]
                    and st["servers"].get(v["primary"], {}).get("serving"))
    return ok


def test_both_replicas_killed_at_once_come_back_protected_and_fail_over(running):
    c = running.cluster
    before = running.mnt / "before"
    data = b"written before both replicas died\n" * 1000
    before.write_bytes(data)
    assert os.stat(before).st_ino >> 48 == GROUP      # the root's group holds it
    v = running.view(GROUP)
    old_p, old_b, num = v["primary"], v["backup"], v["view"]

    # kill -9 both, within milliseconds, the mount idle
    procs = [c.procs[old_p], c.procs[old_b]]
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(10)
    # restart both, the backup first: it must wait for the primary, whose state is newer
    c.start_server(old_b)
    c.start_server(old_p)

    st = c.wait_until(serving_after(num), 90, f"a primary of group {GROUP} again")
    assert view(st)["primary"] == old_p
    num = view(st)["view"]
    st = c.wait_until(lambda st: view(st)["view"] >= num and protected(st, GROUP), 120,
                      f"group {GROUP} protected again")
    assert (view(st)["primary"], view(st)["backup"]) == (old_p, old_b)
    assert before.read_bytes() == data
    (running.mnt / "after-restart").write_text("after the restart\n")

    # later the primary alone is killed: the backup, in sync, takes over
    num = view(st)["view"]
    c.signal(old_p, signal.SIGKILL)
    st = c.wait_until(serving_after(num), 60, f"a failover of group {GROUP}")
    assert view(st)["primary"] == old_b
    assert before.read_bytes() == data
    assert (running.mnt / "after-restart").read_text() == "after the restart\n"
    (running.mnt / "after-failover").write_text("after the failover\n")
    assert {"after-failover", "after-restart", "before"} <= {p.name for p in running.mnt.iterdir()}

    # the killed primary returns as backup; the replicas agree
    c.start_server(old_p)
    c.wait_protected(timeout=120, group=GROUP)
    assert (running.mnt / "after-failover").read_text() == "after the failover\n"
    running.unmount()
    c.stop_all()
    diff, compared = compare_replicas(running.cfg)
    assert compared > 100
    assert diff == {s: [] for s in followers(running.cfg)}
