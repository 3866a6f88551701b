"""Nodes on separate machines (issue 11), as a person would run them: each node in its
own network namespace with its own address, its own copy of the description and the
secret, started with `ip netns exec NS replfs ...` (tests/netnshelp.py). A writer appends
numbered records through the mount, fsyncing each one. The last test keeps the views in
etcd: three etcd members and three view servers, each on its machine too."""

import pytest

from clusterhelp import read_offline
from netnshelp import NetCluster, Writer
from replfs.tools import etcdlocal

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def running(c: NetCluster, ready):
    """`c` made, its view servers and servers started, `ready(status)`, and mounted;
    stopped and removed at the end."""
    try:
        c.make()
        for node in (*c.vss, *NetCluster.SERVERS):
            c.start(node)
        c.wait_status(ready, 60, "a cluster ready")
        c.start("client")
        yield c
    finally:
        c.stop()


@pytest.fixture
def net(tmp_path):
    yield from running(NetCluster(tmp_path), lambda st: st["state"] == "healthy")


def protected(st: dict) -> bool:
    """A view server answers, and the group's primary and backup serve in an acknowledged
    view. (Not `healthy`, which a killed view server makes `degraded`.)"""
    v = (st["viewserver"] or {}).get("groups", {}).get("0") or {}
    return bool(serving(st, not_="") and v["backup"] and st["servers"].get(v["backup"]))


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


@pytest.fixture
def net_etcd(tmp_path):
    """Three view servers over three etcd members, each node on its own machine."""
    if etcdlocal.etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian's etcd-server; tools/bootstrap.sh "
                    "installs it)")
    # healthy: status, run on the client's machine, sees that the two standby view
    # servers run (the active one names them), though they refuse every connection
    yield from running(NetCluster(tmp_path, viewservers=3, etcd=3),
                       lambda st: st["state"] == "healthy")


def active(st: dict) -> str:
    """The view server that answered `status` (only the active one answers)."""
    return (st["viewserver"] or {}).get("name") or ""


def test_view_server_etcd_member_then_primary_killed_on_separate_machines(net_etcd, tmp_path):
    net = net_etcd
    w = Writer(net.mnt / "log", tmp_path / "writer.out")
    try:
        w.wait_acks(20, 60)
        st = net.wait_status(lambda st: protected(st) and active(st), 30,
                             "an active view server")
        old_vs, view = active(st), group(st)["view"]
        # kill -9 the active view server: the mount keeps serving, a standby takes over
        net.kill(old_vs)
        w.wait_acks(20, 60)
        st = net.wait_status(lambda st: active(st) not in ("", old_vs) and protected(st),
                             30, "a standby taking over")
        assert group(st)["view"] == view, "the takeover changed the group's view"
        # it took over because a standby saw the killed one's connection close and its
        # address refuse, and ended its lease (not after etcd expired it)
        assert any(f"{old_vs}, the active view server, died" in net.log(v)
                   for v in net.vss if v != old_vs), [net.log(v)[-2000:] for v in net.vss]
        st = net.wait_status(lambda st: not st["processes"][old_vs]["running"], 30,
                             "the killed view server counted as not running")
        assert [v for v in net.vss if st["processes"][v]["running"]] == \
            [v for v in net.vss if v != old_vs], st["processes"]
        assert any(f"view server {old_vs} not running" in p for p in st["problems"]), \
            st["problems"]
        # kill -9 one etcd member (the first endpoint, the one every view server asks
        # first): nothing changes for the user, nor the views. (Which view server is
        # active may: when that member led etcd, the new leader's election can outlast
        # the active one's lease, and another may be elected.)
        net.kill("m0")
        w.wait_acks(20, 60)
        st = net.wait_status(lambda st: protected(st) and active(st), 30,
                             "the group protected, a view server active")
        assert group(st)["view"] == view, "an etcd member's death changed the group's view"
        # kill -9 the primary: it fails over, the new view committed by 2 of 3 members
        old = group(st)["primary"]
        net.kill(old)
        net.wait_status(lambda st: serving(st, old), 60, "a failover")
        w.wait_acks(20, 60)
    finally:
        w.finish()
    ok, failed = w.results()
    assert not failed, f"appends failed: {failed}"
    found = w.check((net.mnt / "log").read_bytes())
    assert len(ok) >= 80 and set(ok) <= set(found)
