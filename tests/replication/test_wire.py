"""Frames and authentication over real TCP on 127.0.0.1, against an in-process view server."""

import struct

import msgpack
import pytest
import trio

from replfs.fs.core import Attr
from replfs.replication import wire
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
