"""At most once under a lossy network: 10% of requests and 20% of replies dropped between
the client and the servers; retried requests are answered from the replicated table."""

import errno
import os
import signal
import subprocess

import pytest
import trio

from mounthelp import REPLFS

from replfs.replication import wire

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def test_lossy_network_nothing_executed_twice(running):
    for s in running.cfg.servers:
        subprocess.run([*REPLFS, "fault", "loss", running.cfg.dir, "client", s,
                        "--request", "0.1", "--reply", "0.2"], check=True, capture_output=True)
    n = 80
    # appends and mkdirs are not idempotent: a second execution would show
    running.sh(f"""
        for i in $(seq 1 {n}); do echo "a $i" >> log; mkdir d$i; done
        mv log log2; mkdir done""", timeout=150)
    st = running.cluster.status()
    prim = st["viewserver"]["groups"]["0"]["primary"]
    stats = st["servers"][prim]["stats"]
    assert stats["duplicates"] > 0, stats       # retries really happened and were caught
    subprocess.run([*REPLFS, "fault", "heal", running.cfg.dir],
                   check=True, capture_output=True)
    assert (running.mnt / "log2").read_text().splitlines() == [f"a {i}" for i in range(1, n + 1)]
    assert sorted(p.name for p in running.mnt.iterdir()) == sorted(
        ["log2", "done", *(f"d{i}" for i in range(1, n + 1))])


def test_retry_across_failover_is_not_executed_again(running):
    """The same (client, lane, seq) sent to the primary, then (after it is killed) to the
    new primary: the second answer is the recorded one, and the operation happened once."""
    cfg = running.cfg
    secret = cfg.secret()

    async def op(server, seq, method, *args):
        ch = await wire.connect(cfg.direct(server), secret, "test")
        try:
            await ch.send(wire.OpRequest(1, "test-client", 0, seq, method, list(args), {}))
            return await ch.receive()
        finally:
            await ch.aclose()

    old = running.primary()
    first = trio.run(op, old, 1, "mkdir", 1, b"once", 0o755, 0, 0)
    assert isinstance(first, wire.OpReply) and first.errno == 0
    running.cluster.signal(old, signal.SIGKILL)
    new = running.cluster.wait_primary(not_=old)["viewserver"]["groups"]["0"]["primary"]
    again = trio.run(op, new, 1, "mkdir", 1, b"once", 0o755, 0, 0)
    assert isinstance(again, wire.OpReply)
    assert again.errno == 0, os.strerror(again.errno)       # not EEXIST: not executed again
    assert again.value == first.value
    fresh = trio.run(op, new, 2, "mkdir", 1, b"once", 0o755, 0, 0)
    assert fresh.errno == errno.EEXIST                       # a new request does execute
