"""Nodes on separate machines (issue 11), as a person would run them: each node in its
own network namespace with its own address, its own copy of the description and the
secret, started with `ip netns exec NS replfs ...` (tests/netnshelp.py). A writer appends
numbered records through the mount, fsyncing each one."""

import pytest

from clusterhelp import read_offline
from netnshelp import NetCluster, Writer

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture
def net(tmp_path):
    c = NetCluster(tmp_path)
    try:
        c.make()
        for node in ("vs", *NetCluster.SERVERS):
            c.start(node)
        c.wait_status(lambda st: st["state"] == "healthy", 60, "a healthy cluster")
        c.start("client")
        yield c
    finally:
        c.stop()


def group(st: dict) -> dict:
    return st["viewserver"]["groups"]["0"]


def serving(st: dict, not_: str) -> bool:
    v = st["viewserver"].get("groups", {}).get("0") or {}
    return bool(v.get("primary") and v["primary"] != not_ and v.get("acked")
                and (st["servers"].get(v["primary"]) or {}).get("serving"))


def test_a_server_cut_off_the_network_fails_over_and_completes_no_update(net, tmp_path):
    st = net.status()
    assert st["state"] == "healthy", st["problems"]
    old = group(st)["primary"]
    w = Writer(net.mnt / "log", tmp_path / "writer.out")
    try:
        w.wait_acks(20, 60)
        net.net.link(old, up=False)             # its cable pulled
        st = net.wait_status(lambda st: serving(st, old), 60, "a failover")
        new = group(st)["primary"]
        w.wait_acks(20, 60)                     # the writer goes on through the new primary
        # the old primary completed no update: on its own disk the log is a prefix of
        # what the group holds (whatever it executed was retried, unchanged, at the new one)
        net.kill(old)
        cut_off = read_offline(str(net.dir(old) / old), b"log")
        net.net.link(old, up=True)
        net.start(old)                          # back as the backup of the new primary
        net.wait_status(lambda st: st["state"] == "healthy"
                        and (group(st)["primary"], group(st)["backup"]) == (new, old),
                        90, "the old primary back as backup")
        w.wait_acks(10, 60)
        # `replfs fault`, run on the client's machine, reaches each node at its address
        net.replfs("client", "fault", "partition", "DIR", "vs", old)
        net.wait_status(lambda st: group(st)["primary"] == new and not group(st)["backup"],
                        60, "the backup dropped by the view server that cannot hear it")
        net.replfs("client", "fault", "heal", "DIR")
        net.wait_status(lambda st: st["state"] == "healthy", 90, "a backup again")
        w.wait_acks(10, 60)
    finally:
        w.finish()
    content = (net.mnt / "log").read_bytes()
    w.check(content)
    assert content.startswith(cut_off), "the cut-off primary holds an update the group lacks"


def test_both_servers_killed_at_once_come_back_protected(net, tmp_path):
    w = Writer(net.mnt / "log", tmp_path / "writer.out")
    try:
        w.wait_acks(20, 60)
        net.kill(*NetCluster.SERVERS)           # within microseconds of each other
        for s in NetCluster.SERVERS:
            net.start(s)
        st = net.wait_status(lambda st: st["state"] == "healthy", 120,
                             "the group back, protected")
        assert group(st)["primary"] and group(st)["backup"] and group(st)["acked"]
        w.wait_acks(20, 90)                     # the writer goes on
    finally:
        w.finish()
    ok, _ = w.results()
    found = w.check((net.mnt / "log").read_bytes())
    assert len(ok) >= 40 and set(ok) <= set(found)
