"""The view service on etcd (issue 11): three real etcd members started here, three view
server processes (one active, two standing by), a cluster of servers and a real mount
with a writer appending and fsyncing. kill -9 of the active view server: the mount keeps
serving and a standby takes over; a primary killed afterwards fails over; kill -9 of
one of the three etcd members changes nothing for the user. And two view server
processes on one etcd can never fork the sequence of views."""

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import requests
import trio

from clusterhelp import Running, done_after, wait_for
from etcdhelp import etcd_cluster

from replfs.replication import wire
from replfs.replication.config import free_port
from replfs.replication.viewstore import EtcdStore, Fenced
from replfs.tools.cluster import REPLFS

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

WRITER = textwrap.dedent("""
    import os, sys, time
    path, progress, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    i = 0
    with open(path, "ab") as f, open(progress, "a", buffering=1) as log:
        while not os.path.exists(stop):
            f.write(b"%d\\n" % i)
            f.flush()
            os.fsync(f.fileno())
            log.write("%d %.3f\\n" % (i, time.monotonic()))
            i += 1
""")


def test_two_view_servers_never_fork_the_views(tmp_path):
    async def main(endpoints):
        a, b = (EtcdStore(endpoints, "/t", n) for n in "ab")
        try:
            await both(a, b)
        finally:
            a.close()
            b.close()

    async def both(a, b):
        await a.lead()
        assert await a.load() == {}
        await a.save({0: dict(num=1, primary="s0", backup="", acked=False, given={})})
        with trio.move_on_after(1.0) as waited:       # a holds the election key
            await b.lead()
        assert waited.cancelled_caught
        # both run, each with a key under its lease: what `status` on any machine shows
        alive = await a.running()
        assert set(alive) == {"a", "b"} and alive["b"]["pid"] == os.getpid()
        # b stands by until a's lease is gone (revoked here: a stopped cleanly)
        await a.resign()
        await b.lead()
        assert set(await b.running()) == {"b"}      # a's key went with its lease
        table = await b.load()
        assert table[0]["num"] == 1
        await b.save({0: dict(table[0], num=2, primary="s1")})
        # a, computing from what it saw, cannot save over b's view 2
        with pytest.raises(Fenced):
            await a.save({0: dict(num=2, primary="s0", backup="s1", acked=False, given={})})
        # nor can b from a table older than its own last save
        b.table_rev -= 1
        with pytest.raises(Fenced):
            await b.save({0: dict(table[0], num=3)})
        assert (await a.load())[0]["primary"] == "s1"
        # b stalls (renews nothing, as when frozen): it knows when its lease may have
        # run out, a is elected only once etcd expired it, and b's next save fails
        b.table_rev += 1
        await a.lead()
        assert not b.active()
        with pytest.raises(Fenced):
            await b.save({0: dict(table[0], num=3)})
        assert await a.load() == await b.load()
    with etcd_cluster(tmp_path, 3) as etcd:
        trio.run(main, etcd.endpoints)


def test_a_standby_ends_the_lease_only_of_an_active_view_server_that_died(tmp_path):
    """A standby watches the active process over a connection of its own. That
    connection closed while the process still listens (as when a lifted partition
    closes it) is not a death: the standby watches again, and the lease stays. Once the
    process's end closed it and its address refuses connections, the standby ends the
    lease itself and is elected at once -- here the dead one's lease is still being
    renewed (its renewals stand for etcd's expiry, which would come only later), so the
    election can only come from the standby's revocation."""
    secret = os.urandom(32)
    port = free_port()
    watches = []
    moved = trio.Event()        # b watches a second time, or (wrongly) got elected

    async def stands_for_a(ch):        # the active process a's listener
        msg = await ch.receive()
        assert isinstance(msg, wire.Watch) and msg.name == "b"
        watches.append(msg.name)
        await ch.send(wire.Watching("a", a.lease_id))
        if len(watches) > 1:
            moved.set()
            await trio.sleep_forever()
        # the first watch: closed by a while it lives and listens

    async def dial(name):
        assert name == "a"
        return await wire.connect(("127.0.0.1", port), secret, "b")

    async def main(endpoints):
        nonlocal a
        a = EtcdStore(endpoints, "/w", "a")
        b = EtcdStore(endpoints, "/w", "b", dial=dial)
        elected = trio.Event()

        async def b_campaigns():
            await b.lead()
            elected.set()
            moved.set()
        try:
            await a.lead()
            async with trio.open_nursery() as outer:
                renewing = trio.CancelScope()

                async def a_renews():
                    with renewing:
                        await a.keep(renewing)
                outer.start_soon(a_renews)
                async with trio.open_nursery() as listening:
                    await listening.start(wire.serve, port, secret, stands_for_a)
                    outer.start_soon(b_campaigns)
                    with trio.fail_after(30):
                        await moved.wait()
                    # b watches again: a lives and listens, so its lease stays
                    assert not elected.is_set()
                    await a._refresh()
                    assert a.lease_id is not None and a.active()
                    assert await b._leader() == ("a", a.lease_id)
                    listening.cancel_scope.cancel()         # a dies: nothing listens
                with trio.fail_after(30):
                    await elected.wait()
                assert (await b._leader())[0] == "b"
                renewing.cancel()
        finally:
            a.close()
            b.close()
    a = None
    with etcd_cluster(tmp_path, 3) as etcd:
        trio.run(main, etcd.endpoints)


def accepts(addr) -> bool:
    """A view server listens only while it is the active one."""
    try:
        socket.create_connection(addr, timeout=1).close()
        return True
    except OSError:
        return False


def one_active(cfg, names: list[str]) -> list[str]:
    """[the one of `names` that listens], or [] while none or more than one does (an
    old active process closes its listener a moment after its lease ran out; it
    answers nobody meanwhile)."""
    active = [v for v in names if accepts(cfg.direct(v))]
    return active if len(active) == 1 else []


def etcd_views(etcd, cfg) -> dict:
    r = requests.post(f"http://{etcd.live_endpoint()}/v3/kv/range", timeout=5,
                      json={"key": base64.b64encode(f"{cfg.etcd_prefix}/views".encode()).decode()})
    return json.loads(base64.b64decode(r.json()["kvs"][0]["value"]))


def etcd_leader(etcd) -> str:
    """The etcd member that is raft leader now."""
    for n, ep in zip(etcd.names, etcd.endpoints):
        if n in etcd.killed:
            continue
        st = requests.post(f"http://{ep}/v3/maintenance/status", json={}, timeout=5).json()
        if st["leader"] == st["header"]["member_id"]:
            return n
    raise AssertionError("no etcd leader")


@pytest.mark.soak   # the same failures, each node on its own "machine", run every time in
                    # test_netns.py (test_view_server_etcd_member_then_primary_killed_...)
def test_view_service_on_etcd_survives_its_failures(tmp_path):
    with etcd_cluster(tmp_path, 3) as etcd:
        running = Running(tmp_path / "cluster", tmp_path / "mnt", groups=1,
                          viewservers=3, etcd=etcd.endpoints)
        c, cfg = running.cluster, running.cfg
        stop = tmp_path / "stop"
        progress = tmp_path / "progress"
        writer = None
        try:
            running.start()
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(running.mnt / "log"),
                                       str(progress), str(stop)])
            wait_for(lambda: done_after(progress, 0) >= 10, 60, "the writer going")
            active = wait_for(lambda: one_active(cfg, cfg.viewservers), 30,
                              "one active view server")

            # kill -9 the active view server: the mount keeps serving, a standby takes over
            c.signal(active[0])
            killed = time.monotonic()
            others = [v for v in cfg.viewservers if v != active[0]]
            new = wait_for(lambda: one_active(cfg, others), 30, "a standby taking over")[0]
            took_over = time.monotonic() - killed
            wait_for(lambda: done_after(progress, killed) >= 10, 60,
                     "appends after the view server's death")
            assert writer.poll() is None
            print(f"standby {new} active {took_over:.2f} s after kill -9 of {active[0]}")
            report = " ".join(subprocess.run([*REPLFS, "status", cfg.dir], text=True,
                                             capture_output=True, timeout=60).stdout.split())
            assert any(f"view servers: {v} active, " in report for v in others), report
            assert f"view server {active[0]} not running: 2 of 3 left" in report, report

            # a primary killed afterwards fails over, the new view committed in etcd
            old = running.primary(0)
            c.signal(old)
            failed = time.monotonic()
            c.wait_primary(not_=old, timeout=30)
            wait_for(lambda: done_after(progress, failed) >= 10, 60,
                     "appends after the failover")

            # kill -9 the etcd leader: nothing changes for the user, and views still
            # change (2 of 3 members): the killed server comes back as backup
            etcd.kill(etcd_leader(etcd))
            lost = time.monotonic()
            c.start_server(old)
            c.wait_protected(timeout=60)
            wait_for(lambda: done_after(progress, lost) >= 10, 60,
                     "appends after an etcd member's death")
            # what the view service answers is what etcd holds
            wait_for(lambda: etcd_views(etcd, cfg)["0"]["num"]
                     == c.status()["viewserver"]["groups"]["0"]["view"], 30,
                     "the view in etcd and the view server's alike")
            assert writer.poll() is None
        finally:
            stop.touch()
            if writer is not None:
                try:
                    writer.wait(60)
                except subprocess.TimeoutExpired:
                    writer.kill()
                    writer.wait(10)
            try:
                if writer is not None and writer.returncode == 0:
                    acked = len(progress.read_text().splitlines())
                    lines = (running.mnt / "log").read_bytes().splitlines()
                    # every acknowledged append there, once, in order
                    assert lines[:acked] == [b"%d" % i for i in range(acked)]
                    assert len(lines) == acked
            finally:
                running.stop()
        assert writer.returncode == 0
