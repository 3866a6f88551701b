"""Frames and authentication over real TCP on 127.0.0.1, against an in-process view server."""

import struct
from functools import partial

import msgpack
import pytest
import trio

from replfs.fs.core import Attr
from replfs.replication import wire
from replfs.replication.config import Addr
from replfs.replication.viewserver import ViewService, serve_viewserver

pytestmark = pytest.mark.timeout(20)
SECRET = b"s" * 32


def test_roundtrip_every_message_kind():
    a = Attr(1, 0o40755, 2, 0, 0, 0, 4096, 8, 1, 2, 3, 4)
    for msg in [wire.Ping(0, "s0", 3), wire.ViewReply(0, 2, "s0", "s1", True),
                wire.OpRequest(7, "c", 1, 9, "lookup", [1, b"name"], {}),
                wire.OpReply(7, [[b"x", a, 3]]), wire.OpReply(8, a),
                wire.Forward(3, "s0", [[10, [[5, 0, b"abc"]]]])]:
        data = wire.encode(msg)
        assert wire.decode(data[4:]) == msg


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb({"a": 1}), msgpack.packb(["nope"]),
                                  msgpack.packb(["ping", 1]), msgpack.packb([]),
                                  msgpack.packb(["ping", 0, "x", 1, 2, 3, 4]),
                                  msgpack.packb(msgpack.ExtType(7, b"x"))])
def test_malformed_bodies_raise_protocol_error(body):
    with pytest.raises(wire.ProtocolError):
        wire.decode(body)


async def raw(port):
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_closed(stream) -> bool:
    """True if the server closes the connection (reads until EOF)."""
    with trio.fail_after(5):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return True
            if not data:
                return True


async def good_ping(port):
    ch = await wire.connect(("127.0.0.1", port), SECRET, "t")
    await ch.send(wire.Ping(0, "s0", 0))
    reply = await ch.receive()
    await ch.aclose()
    return reply


async def test_bad_peers_are_refused_and_the_server_keeps_serving(nursery, caplog):
    port = await nursery.start(serve_viewserver, 0, SECRET, ViewService())
    # wrong secret
    with pytest.raises((wire.ProtocolError, EOFError, trio.BrokenResourceError)):
        await wire.connect(("127.0.0.1", port), b"x" * 32, "intruder")
    # no authentication at all: a ping straight away
    s = await raw(port)
    await s.send_all(wire.encode(wire.Ping(0, "evil", 0)))
    assert await read_closed(s)
    # garbage bytes
    s = await raw(port)
    await s.send_all(b"\x00\x00\x00\x05hello")
    assert await read_closed(s)
    # an oversized frame after authenticating
    ch = await wire.connect(("127.0.0.1", port), SECRET, "t")
    await ch.stream.send_all(struct.pack(">I", wire.MAX_FRAME + 1))
    assert await read_closed(ch.stream)
    # a malformed frame after authenticating
    ch = await wire.connect(("127.0.0.1", port), SECRET, "t")
    await ch.stream.send_all(struct.pack(">I", 3) + b"\x93\xc1\xc1")
    assert await read_closed(ch.stream)
    # a well-formed message of the wrong kind
    ch = await wire.connect(("127.0.0.1", port), SECRET, "t")
    await ch.send(wire.Ack(3))
    assert await read_closed(ch.stream)
    # and the server still answers a proper client
    reply = await good_ping(port)
    assert reply == wire.ViewReply(0, 1, "s0", "", False)
    assert "authentication failed" in caplog.text
    assert "exceeds" in caplog.text


async def test_stalled_connections_are_closed_and_logged(nursery, caplog, monkeypatch):
    """Before authenticating, a connection that says nothing is closed after
    AUTH_TIMEOUT; after it, one that sends half a frame and then nothing is closed after
    FRAME_TIMEOUT; both with a log line saying why. An idle authenticated connection
    (between frames) is kept for as long as it lasts."""
    monkeypatch.setattr(wire, "AUTH_TIMEOUT", 0.5)
    monkeypatch.setattr(wire, "FRAME_TIMEOUT", 0.5)
    port = await nursery.start(wire.serve, 0, SECRET, echo)
    silent = await raw(port)
    idle = await wire.connect(("127.0.0.1", port), SECRET, "idle")
    half = await wire.connect(("127.0.0.1", port), SECRET, "half")
    await half.stream.send_all(wire.encode(wire.Ping(0, "s0", 0))[:7])
    assert await read_closed(silent)
    assert await read_closed(half.stream)
    assert "no authentication within 0.5 s" in caplog.text
    assert "half a frame (7 of" in caplog.text
    # the idle one has outlived both timeouts many times over, and still works
    with trio.fail_after(5):
        await idle.send(wire.Ping(0, "s0", 1))
        assert await idle.receive() == wire.Ping(0, "s0", 1)
    await idle.aclose()


# ---------------------------------------------------------------- network faults
async def echo(ch):
    while True:
        await ch.send(await ch.receive())


async def wait_for(cond, timeout: float = 5.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def tell(port, generation, partitions=(), loss=None):
    """What `replfs fault` does: SetFaults over an authenticated connection, then the ack."""
    ch = await wire.connect(("127.0.0.1", port), SECRET, "fault")
    try:
        await ch.send(wire.SetFaults(generation, [list(p) for p in partitions], loss or {},
                                     "vs"))
        with trio.fail_after(5):
            assert await ch.receive() == wire.FaultsApplied(generation)
    finally:
        await ch.aclose()


async def test_faults_are_enforced_by_the_listener_for_a_client_it_cannot_tell(nursery):
    vs = wire.NetFaults("vs", seed=1)      # the listener's faults; the client has none
    port = await nursery.start(partial(wire.serve, 0, SECRET, echo, faults=vs))
    client = wire.NetFaults()
    addr = Addr("127.0.0.1", port, "vs")

    async def dial():
        return await wire.connect(addr, SECRET, "client", faults=client)

    ping = wire.Ping(0, "s0", 1)
    old = await dial()
    await old.send(ping)
    assert await old.receive() == ping

    # partition: the open connection carries nothing, a new one never authenticates
    await tell(port, 1, [("vs", "client")])
    await old.send(ping)
    await wait_for(lambda: vs.stats["dropped_in"] == 1)
    held: dict = {}

    async def dial_held():
        try:
            held["ch"] = await dial()
        except wire.CONN_ERRORS as exc:
            held["error"] = exc
    nursery.start_soon(dial_held)
    await wait_for(lambda: vs.stats["held"] == 1)
    assert held == {}

    # heal: both connections closed at once (peers reconnect), a new one works
    await tell(port, 2)
    await wait_for(lambda: held)
    assert isinstance(held.get("error"), EOFError), held
    with pytest.raises(wire.CONN_ERRORS), trio.fail_after(5):
        await old.receive()
    ch = await dial()
    await ch.send(ping)
    assert await ch.receive() == ping

    # loss 1 from the client: the handshake still passes, every frame after it is dropped
    await tell(port, 3, loss={"client>vs": {"request": 1.0, "reply": 0.0}})
    lossy = await dial()
    await lossy.send(ping)
    await wait_for(lambda: vs.stats["dropped_in"] == 2)
    # loss 1 towards the client: the listener drops its answers before sending them
    await tell(port, 4, loss={"client>vs": {"request": 0.0, "reply": 1.0}})
    await lossy.send(ping)
    await wait_for(lambda: vs.stats["dropped_out"] == 1)
    with trio.move_on_after(0.2):
        pytest.fail(f"a dropped answer arrived: {await lossy.receive()}")

    await tell(port, 5)
    await lossy.send(ping)
    assert await lossy.receive() == ping
    assert client.stats == dict(dropped_in=0, dropped_out=0, held=0)


async def test_a_dialler_across_a_partition_waits_until_it_is_lifted(nursery):
    """A server dialling: its own faults hold the connection, even if the listener (here
    told nothing) answers the handshake; lifting the partition ends the wait."""
    port = await nursery.start(partial(wire.serve, 0, SECRET, echo, faults=wire.NetFaults("vs")))
    s0 = wire.NetFaults("s0")
    s0.update(1, [["vs", "s0"]], {})
    result: dict = {}

    async def dial():
        try:
            result["ch"] = await wire.connect(Addr("127.0.0.1", port, "vs"), SECRET, "s0",
                                              faults=s0)
        except wire.CONN_ERRORS as exc:
            result["error"] = exc
    nursery.start_soon(dial)
    await wait_for(lambda: s0.stats["held"] == 1)
    assert result == {}
    lifted = s0.update(2, [], {})
    assert len(lifted) == 1
    await lifted[0].aclose()
    await wait_for(lambda: result)
    assert isinstance(result.get("error"), wire.Partitioned), result
    # and with no fault, the same dial works
    ch = await wire.connect(Addr("127.0.0.1", port, "vs"), SECRET, "s0", faults=s0)
    await ch.send(wire.Ack(1))
    assert await ch.receive() == wire.Ack(1)


async def test_set_faults_needs_authentication_and_a_well_formed_state(nursery):
    vs = wire.NetFaults("vs")
    port = await nursery.start(partial(wire.serve, 0, SECRET, echo, faults=vs))
    s = await raw(port)
    await s.send_all(wire.encode(wire.SetFaults(1, [["vs", "client"]], {}, "vs")))
    assert await read_closed(s)
    ch = await wire.connect(("127.0.0.1", port), SECRET, "fault")
    await ch.send(wire.SetFaults(1, [["vs"]], {}, "vs"))
    assert await read_closed(ch.stream)
    assert vs.generation == 0 and not vs.cut("vs", "client")
