"""Unauthenticated and malformed frames sent to a real server process are refused, and
the server keeps serving its clients."""

import struct

import pytest
import trio

from replfs.replication import wire

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]


async def closed_by_peer(stream) -> bool:
    with trio.fail_after(5):
        while True:
            try:
                if not await stream.receive_some(65536):
                    return True
            except trio.BrokenResourceError:
                return True


def test_bad_frames_refused_server_keeps_serving(running):
    cfg = running.cfg
    prim = running.primary()
    addr = cfg.direct(prim)

    async def attack():
        # a client that does not know the secret
        with pytest.raises((wire.ProtocolError, EOFError, trio.BrokenResourceError)):
            await wire.connect(addr, b"not the secret" * 2, "intruder")
        # an operation without authenticating first
        s = await trio.open_tcp_stream(*addr)
        await s.send_all(wire.encode(wire.OpRequest(1, "x", 0, 1, "mkdir",
                                                    [1, b"evil", 0o755, 0, 0], {})))
        assert await closed_by_peer(s)
        secret = cfg.secret()
        # after authenticating: garbage, an oversized length, a wrong field count,
        # a wrong field type, an unknown method
        for payload in [struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1",
                        struct.pack(">I", wire.MAX_FRAME + 1),
                        struct.pack(">I", 3) + b"\x92\xa2op",
                        wire.encode(wire.OpRequest("1", "x", 0, 1, "mkdir", [], {})),
                        wire.encode(wire.OpRequest(1, "x", 0, 1, "__class__", [], {})),
                        wire.encode(wire.Forward(1, "s9", "not a list"))]:
            ch = await wire.connect(addr, secret, "fuzzer")
            await ch.stream.send_all(payload)
            assert await closed_by_peer(ch.stream), payload
    trio.run(attack)
    # the mount (through the same server) still works, and nothing was created
    running.sh("echo still-serving > ok")
    assert (running.mnt / "ok").read_text() == "still-serving\n"
    assert not (running.mnt / "evil").exists()
    log = running.log(prim)
    assert "authentication failed" in log
    assert "closing connection" in log
