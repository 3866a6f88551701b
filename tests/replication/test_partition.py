"""A primary cut off from the view server (but not from its client) completes no update
once a new view exists, and its client is redirected."""

import subprocess
import time

import pytest
import trio

from mounthelp import REPLFS
from replfs.replication import wire

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def fault(*args):
    subprocess.run([*REPLFS, "fault", *args], check=True, capture_output=True)


def test_partitioned_primary_completes_no_update(running):
    cfg = running.cfg
    old = running.primary()
    running.sh("echo before > f")
    fault("partition", cfg.dir, old, "vs")
    try:
        new_view = running.cluster.wait_primary(not_=old, timeout=30)
        new = new_view["viewserver"]["groups"]["0"]["primary"]
        # the client (not cut off from the old primary) is redirected and keeps working
        running.sh("echo after >> f; mkdir d2")
        assert (running.mnt / "f").read_text() == "before\nafter\n"

        # an update sent straight to the old primary is not completed
        async def update():
            ch = await wire.connect(cfg.direct(old), cfg.secret(), "test")
            try:
                await ch.send(wire.OpRequest(1, "test-direct", 0, 1, "mkdir",
                                             [1, b"split-brain", 0o755, 0, 0], {}))
                with trio.fail_after(10):
                    return await ch.receive()
            finally:
                await ch.aclose()
        reply = trio.run(update)
        assert isinstance(reply, wire.NotPrimary), reply
        assert not (running.mnt / "split-brain").exists()
        assert new != old
    finally:
        fault("heal", cfg.dir)
    # after healing, the old primary learns the new view and comes back as the backup
    running.cluster.wait_protected(timeout=60)
    assert running.primary() == new
    assert (running.mnt / "f").read_text() == "before\nafter\n"
    assert not (running.mnt / "split-brain").exists()


def test_forwards_from_a_deposed_primary_are_refused(running):
    """The backup refuses forwards from anyone who is not the primary of its view."""
    cfg = running.cfg
    st = running.view()
    backup = st["backup"]

    async def forward():
        ch = await wire.connect(cfg.direct(backup), cfg.secret(), "test")
        try:
            await ch.send(wire.Forward(st["view"], "impostor", [[1, [[100, 0, b"x"]], "commit", None, []]]))
            with trio.fail_after(10):
                return await ch.receive()
        finally:
            await ch.aclose()
    reply = trio.run(forward)
    assert isinstance(reply, wire.Refused)
    # and a client request to the backup is refused too
    async def op():
        ch = await wire.connect(cfg.direct(backup), cfg.secret(), "test")
        try:
            await ch.send(wire.OpRequest(1, "c", 0, 1, "getattr", [1], {}))
            with trio.fail_after(10):
                return await ch.receive()
        finally:
            await ch.aclose()
    assert isinstance(trio.run(op), wire.NotPrimary)
    time.sleep(0)
