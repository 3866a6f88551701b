"""The wire: length-prefixed msgpack frames over trio TCP, one dataclass per message
(replication/messages.py, whose names this module re-exports).

Frames and their encoding (replication/frames.py, whose names this module re-exports):
a 4-byte length, then a msgpack array ``[tag, fields...]``; anything else raises
`ProtocolError`, and the caller closes that one connection and logs it. Nothing is ever
unpickled. A connection may idle between frames for ever, but not stall inside one
(`FRAME_TIMEOUT`) nor before authenticating (`AUTH_TIMEOUT`).

Authentication happens before anything else, on every connection: the listener sends
`Challenge(nonce)`, the dialer answers `AuthResponse(hmac(secret, "dial"+nonce),
nonce2)`, the listener answers `AuthOk(hmac(secret, "listen"+nonce2))`. So each side
proves it holds the cluster secret (as DRBD's shared secret does) and a replayed answer
is useless (fresh nonces).

Network faults (`replfs fault partition | loss | heal`) are injected here, in each
process's own connections, by `NetFaults` (replication/netfaults.py): nothing sits
between two processes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

import trio

from replfs.errors import ReplfsError
from replfs.replication.frames import (_LEN, MAX_FRAME, MESSAGES, ProtocolError,  # noqa: F401
                                       decode, encode, message, pack_value, unpack_value)
from replfs.replication.messages import (  # noqa: F401 (re-exported: wire.OpRequest, ...)
    Challenge, AuthResponse, AuthOk, Ping, GetView, ViewReply, StatusRequest,
    StatusReply, Watch, Watching, SetFaults, FaultsApplied, CrashAt, OpRequest, OpReply,
    NotPrimary, SyncStart, SyncPosition, Forward, Snapshot, SyncDone, Flush, Renew, Ack, Refused,
    HealRequest, HealReply)
from replfs.replication.netfaults import FAULTS, NetFaults  # noqa: F401 (wire.FAULTS)

log = logging.getLogger("replfs.wire")

AUTH_TIMEOUT = 5.0
# Once a frame's first bytes came, the rest must come within this (an idle connection,
# between frames, may wait for ever: clients keep theirs open)
FRAME_TIMEOUT = 30.0
QUICK_READS = 32            # reads in a row that skip trio's scheduling round, at most


class RemoteError(ReplfsError):
    """A peer could not be reached or answered with an error."""


class Partitioned(EOFError):
    """A connection across a partition ended: its peer gave up, or the partition was
    lifted (and the connection closed so that the peer reconnects at once)."""


# ---------------------------------------------------------------- channel

class Channel:
    """An authenticated, framed connection. `send` may be called from several tasks;
    `receive` from one.

    Once authenticated, it knows its two ends' node names (`local`, `node`) and passes
    every frame through `faults`. A channel a listener accepted (`control`) also takes
    SetFaults for `faults` itself: `receive` applies and answers it, and goes on
    waiting, so that no message loop needs to know about faults."""

    def __init__(self, stream: trio.abc.Stream, peer: str = "?", *,
                 faults: NetFaults | None = None, control: bool = False):
        self.stream = stream
        self.peer = peer
        self.faults = faults
        self.control = control
        self.node = ""              # the peer's node name, once authenticated
        self._local = ""            # ours ("": the process's, `faults.node`)
        self._open = False          # handshake done: faults and SetFaults apply
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        # The socket's descriptor, for reads and writes that need no scheduling round:
        # trio's socket stream yields once after every successful send or receive
        # (a checkpoint), which on a message path of a dozen sends and receives is a
        # good part of each operation's cost. None for other streams.
        sock = getattr(stream, "socket", None)
        self._fd = sock.fileno() if sock is not None else None
        self._closed = False
        self._quick = 0             # reads in a row that found bytes waiting

    @property
    def local(self) -> str:
        return self._local or (self.faults.node if self.faults is not None else "")

    async def _exactly(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(buf)))
            if not chunk:
                raise EOFError(f"{self.peer} closed the connection")
            if not buf and len(chunk) >= n:     # the common case: no copy at all
                if len(chunk) > n:
                    buf += memoryview(chunk)[n:]
                    return chunk[:n]
                return chunk
            buf += chunk
        if len(buf) == n:
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(memoryview(buf)[:n])
            del buf[:n]         # (a bytearray drops its head without moving the rest)
        return out

    def _whole_frame(self) -> bytes | None:
        """The next frame's body if all of it is here already, else None."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (n,) = _LEN.unpack_from(buf)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
        if len(buf) < 4 + n:
            return None
        body = bytes(memoryview(buf)[4:4 + n])
        del buf[:4 + n]
        return body

    async def _read_some(self) -> bytes:
        """What the socket has (at least one byte; EOFError at its end), read at once
        when bytes are waiting -- yielding to the scheduler only every QUICK_READS such
        reads, so that a busy connection cannot starve the others."""
        if self._fd is None:
            chunk = await self.stream.receive_some(65536)
        else:
            chunk = None
            if self._quick < QUICK_READS:
                if self._closed:
                    raise trio.ClosedResourceError("the channel was closed")
                try:
                    chunk = os.read(self._fd, 65536)
                    self._quick += 1
                except BlockingIOError:
                    pass
            if chunk is None:
                self._quick = 0
                chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"{self.peer} closed the connection")
        return chunk

    async def receive(self):
        """The next message. Waits as long as it takes for a frame to begin (a connection
        may be idle for ever), then at most FRAME_TIMEOUT for the rest of it: half a
        frame and then nothing raises ProtocolError."""
        while True:
            if not self._buf:
                self._buf += await self._read_some()
            body = self._whole_frame()
            if body is None:        # (no cancel scope on the common path: they cost)
                n = 0
                with trio.move_on_after(FRAME_TIMEOUT) as limit:
                    (n,) = _LEN.unpack(await self._exactly(4))
                    if n > MAX_FRAME:
                        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
                    body = await self._exactly(n)
                if limit.cancelled_caught:
                    got = len(self._buf) + (4 if n else 0)
                    raise ProtocolError(f"half a frame ({got} of {n + 4 if n else '?'} bytes), "
                                        f"then nothing for {FRAME_TIMEOUT:g} s")
            if self._open and self.faults.drop_incoming(self.local, self.node):
                continue
            msg = decode(body)
            if self._open and self.control and isinstance(msg, SetFaults):
                await self._set_faults(msg)
                continue
            return msg

    async def send(self, msg) -> None:
        data = encode(msg)
        if self._open and self.faults.drop_outgoing(self.local, self.node):
            return
        if self._fd is not None and not self._send_lock.locked():
            # nobody else is sending: write what the socket takes at once, without a
            # scheduling round; the rest (a full socket buffer) the usual way
            if self._closed:
                raise trio.ClosedResourceError("the channel was closed")
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            if n == len(data):
                return
            data = memoryview(data)[n:]
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except BaseException:
                # part of a frame may be on the wire (cancelled, or the peer gone): no
                # later frame may follow it, so the connection ends here
                await self.aclose()
                raise

    async def aclose(self) -> None:
        self._closed = True
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def _set_faults(self, msg: SetFaults) -> None:
        try:
            lifted = self.faults.update(msg.generation, msg.partitions, msg.loss,
                                        msg.node if isinstance(msg.node, str) else "")
        except ValueError as exc:
            raise ProtocolError(f"malformed set-faults: {exc}") from None
        log.warning("network faults from %s: %s%s", self.peer, self.faults,
                    f"; closing {len(lifted)} connections across lifted partitions"
                    if lifted else "")
        for ch in lifted:
            await ch.aclose()
        await self.send(FaultsApplied(self.faults.generation))

    async def _bind(self, local: str, node) -> None:
        """Name the ends (after the peer proved the secret, before the last handshake
        frame). Across a partition, hold the connection: read and drop whatever comes
        until the peer gives up or the partition is lifted (then raise Partitioned)."""
        self._local = local
        self.node = node if isinstance(node, str) else ""
        if self.faults is None or not self.node:
            return
        self.faults.track(self)
        if not self.faults.cut(self.local, self.node):
            return
        self.faults.stats["held"] += 1
        try:
            while await self.stream.receive_some(65536):
                pass
            why = "the peer closed it"
        except trio.ClosedResourceError:        # we closed it: see NetFaults.update
            why = "the partition was lifted"
        except (trio.BrokenResourceError, OSError) as exc:
            why = f"the peer broke it ({exc})"
        raise Partitioned(f"connection {self.local}-{self.peer} across a partition "
                          f"ended: {why}")


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


async def _expect(ch: Channel, cls):
    msg = await ch.receive()
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected {cls.TAG}, got {msg.TAG}")
    return msg


async def accept_auth(ch: Channel, secret: bytes) -> str:
    """Listener side of the handshake; returns the dialler's name or raises ProtocolError
    (or Partitioned, for a dialler across a partition, once that connection ends)."""
    nonce = os.urandom(16)
    with trio.move_on_after(AUTH_TIMEOUT) as limit:
        await ch.send(Challenge(nonce))
        resp = await _expect(ch, AuthResponse)
        if not (isinstance(resp.mac, bytes) and isinstance(resp.nonce, bytes)
                and hmac.compare_digest(resp.mac, _mac(secret, b"dial", nonce))):
            raise ProtocolError("authentication failed (wrong cluster secret?)")
    if limit.cancelled_caught:
        raise ProtocolError(f"no authentication within {AUTH_TIMEOUT:g} s "
                            f"({len(ch._buf)} bytes received)")
    ch.peer = f"{resp.name}@{ch.peer}" if isinstance(resp.name, str) else ch.peer
    await ch._bind("", resp.name)
    await ch.send(AuthOk(_mac(secret, b"listen", resp.nonce)))
    ch._open = ch.faults is not None
    return resp.name


async def dial_auth(ch: Channel, secret: bytes, name: str, node: str = "") -> None:
    """Dialler side of the handshake, as `name`, to node `node` ("" when not a node)."""
    nonce = os.urandom(16)
    with trio.move_on_after(AUTH_TIMEOUT) as limit:
        chal = await _expect(ch, Challenge)
        if not isinstance(chal.nonce, bytes):
            raise ProtocolError("bad challenge")
        await ch.send(AuthResponse(_mac(secret, b"dial", chal.nonce), nonce, name))
        ok = await _expect(ch, AuthOk)
        if not (isinstance(ok.mac, bytes)
                and hmac.compare_digest(ok.mac, _mac(secret, b"listen", nonce))):
            raise ProtocolError("the listener failed to prove the cluster secret")
        # across a partition the handshake hangs, as through a cut cable
        await ch._bind(name, node)
    if limit.cancelled_caught:
        raise trio.TooSlowError(f"{ch.peer} did not complete the handshake within "
                                f"{AUTH_TIMEOUT:g} s")
    ch._open = ch.faults is not None


async def connect(addr: tuple[str, int], secret: bytes, name: str, *,
                  node: str | None = None, faults: NetFaults | None = None) -> Channel:
    """Dial and authenticate as `name`. `node` names whom we dial (default: `addr.node`,
    which ClusterConfig's addresses carry), for the network faults of `faults` (default:
    this process's). Raises OSError (unreachable), ProtocolError, EOFError (Partitioned
    among them) or trio.TooSlowError; callers bound it with their own deadline."""
    node = getattr(addr, "node", "") if node is None else node
    stream = await trio.open_tcp_stream(*addr)
    ch = Channel(stream, f"{node + '@' if node else ''}{addr[0]}:{addr[1]}",
                 faults=FAULTS if faults is None else faults)
    try:
        await dial_auth(ch, secret, name, node)
    except BaseException:
        await ch.aclose()
        raise
    return ch


async def serve(port: int, secret: bytes, on_connection, *, host: str = "127.0.0.1",
                faults: NetFaults | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on host:port; for each authenticated connection run
    `await on_connection(channel)`, under the network faults of `faults` (default: this
    process's), which SetFaults on any connection replaces. Any ProtocolError/EOF/OSError
    ends that connection only (logged); the listener keeps serving."""
    faults = FAULTS if faults is None else faults

    async def handler(stream):
        peer = "?"
        try:
            sockname = stream.socket.getpeername()
            peer = f"{sockname[0]}:{sockname[1]}"
        except OSError:
            pass
        ch = Channel(stream, peer, faults=faults, control=True)
        try:
            try:
                await accept_auth(ch, secret)
            except Partitioned as exc:
                log.debug("%s", exc)
                return
            except (ProtocolError, EOFError, trio.TooSlowError, OSError,
                    trio.BrokenResourceError) as exc:
                log.warning("refused connection from %s: %s", ch.peer, exc)
                return
            await on_connection(ch)
        except BaseException as exc:
            proto, rest = _split(exc)
            if proto is not None:
                log.warning("closing connection from %s: %s", ch.peer, proto)
            if rest is not None:
                raise rest
        finally:
            await ch.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


def _split(exc: BaseException):
    """(the first ProtocolError in `exc` or None, what remains that is not a connection
    error or None): a connection's errors end that connection only."""
    if isinstance(exc, BaseExceptionGroup):
        proto, rest = exc.split(ProtocolError)
        rest = rest.split(CONN_ERRORS)[1] if rest is not None else None
        first = proto.exceptions[0] if proto is not None else None
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        return first, rest
    if isinstance(exc, ProtocolError):
        return exc, None
    if isinstance(exc, CONN_ERRORS):
        return None, None
    return None, exc


def hung_up(exc: BaseException) -> bool:
    """Did the peer's end close the connection -- its process ended (its kernel closes
    its sockets) or it closed it -- rather than a timeout, our own close or a partition?"""
    if isinstance(exc, Partitioned):
        return False
    if isinstance(exc, trio.BrokenResourceError):
        exc = exc.__cause__
    return isinstance(exc, (EOFError, ConnectionResetError))


CONN_ERRORS = (OSError, EOFError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError,
               trio.ClosedResourceError)
