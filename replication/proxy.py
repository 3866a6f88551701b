"""The fault-injecting proxy (`replfs proxy DIR`): one listening port per route (A, B),
forwarding to B's own port, so that faults can be injected per pair of nodes:

- *partition* A B: both routes A>B and B>A go silent, like a cut cable: bytes in flight
  are dropped, open connections stay open but carry nothing, new ones are accepted and
  carry nothing. `heal` closes those dead connections so that peers reconnect at once.
- *loss* A B: whole frames (never the authentication handshake) dropped with a
  probability per direction: A>B ("requests") and B>A ("replies").

The fault state is `DIR/faults.json` (`generation`, `partitions`, `loss`); `replfs fault`
rewrites it and sends SIGHUP; the proxy re-reads it and writes the generation it applied
to `DIR/run/proxy.applied`, which the command waits for.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import struct

import trio

from replfs.replication.config import HOST, ClusterConfig

log = logging.getLogger("replfs.proxy")
HANDSHAKE_FRAMES = 2        # never drop the challenge/response frames


def read_faults(cfg: ClusterConfig) -> dict:
    try:
        with open(cfg.faults_path()) as f:
            d = json.load(f)
    except (FileNotFoundError, ValueError):
        d = {}
    d.setdefault("generation", 0)
    d.setdefault("partitions", [])
    d.setdefault("loss", {})
    return d


def write_faults(cfg: ClusterConfig, faults: dict) -> int:
    faults["generation"] = int(faults.get("generation", 0)) + 1
    tmp = cfg.faults_path() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(faults, f)
    os.replace(tmp, cfg.faults_path())
    return faults["generation"]


def applied_path(cfg: ClusterConfig) -> str:
    return os.path.join(cfg.run_dir(), "proxy.applied")


class Proxy:
    def __init__(self, cfg: ClusterConfig, seed: int | None = None):
        self.cfg = cfg
        self.faults = read_faults(cfg)
        self.rng = random.Random(seed)
        self.conns: dict[str, set] = {}      # route -> {cancel scopes of its connections}
        self.stats = dict(frames=0, dropped=0, blackholed=0)

    def cut(self, src: str, dst: str) -> bool:
        return any({src, dst} == set(p) for p in self.faults["partitions"])

    def loss(self, src: str, dst: str) -> tuple[float, float]:
        spec = self.faults["loss"].get(f"{src}>{dst}") or {}
        return float(spec.get("request", 0.0)), float(spec.get("reply", 0.0))

    async def reload(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as sigs:
            async for _ in sigs:
                self.faults = read_faults(self.cfg)
                log.info("faults: %s", self.faults)
                for route, scopes in self.conns.items():
                    src, dst = route.split(">")
                    if not self.cut(src, dst):
                        for sc in list(scopes):
                            if getattr(sc, "blackholed", False):
                                sc.cancel()
                with open(applied_path(self.cfg), "w") as f:
                    f.write(str(self.faults["generation"]))

    async def serve_route(self, route: str, port: int, task_status=trio.TASK_STATUS_IGNORED):
        src, dst = route.split(">")
        self.conns[route] = set()

        async def handler(client_stream):
            scope = trio.CancelScope()
            self.conns[route].add(scope)
            try:
                with scope:
                    try:
                        server_stream = await trio.open_tcp_stream(*self.cfg.direct(dst))
                    except OSError:
                        return
                    async with server_stream, trio.open_nursery() as nursery:
                        nursery.start_soon(self.pump, client_stream, server_stream, src, dst,
                                           0, scope)
                        nursery.start_soon(self.pump, server_stream, client_stream, src, dst,
                                           1, scope)
            finally:
                self.conns[route].discard(scope)
                with trio.CancelScope(shield=True):
                    await client_stream.aclose()

        listeners = await trio.open_tcp_listeners(port, host=HOST)
        task_status.started()
        await trio.serve_listeners(handler, listeners)

    async def pump(self, a, b, src: str, dst: str, direction: int, scope) -> None:
        """Copy frames a -> b (direction 0: src>dst requests, 1: replies)."""
        buf = bytearray()
        nframes = 0
        try:
            while True:
                data = await a.receive_some(65536)
                if not data:
                    break
                if self.cut(src, dst):
                    scope.blackholed = True
                    self.stats["blackholed"] += len(data)
                    buf.clear()
                    continue
                buf += data
                out = bytearray()
                while len(buf) >= 4:
                    (n,) = struct.unpack(">I", buf[:4])
                    if n > 16 * 2**20:      # not our framing: pass bytes through untouched
                        out += buf
                        buf.clear()
                        break
                    if len(buf) < 4 + n:
                        break
                    frame = bytes(buf[:4 + n])
                    del buf[:4 + n]
                    nframes += 1
                    self.stats["frames"] += 1
                    p = self.loss(src, dst)[direction]
                    if nframes > HANDSHAKE_FRAMES and p and self.rng.random() < p:
                        self.stats["dropped"] += 1
                        continue
                    out += frame
                if out:
                    await b.send_all(bytes(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()


async def run_proxy(cfg: ClusterConfig, task_status=trio.TASK_STATUS_IGNORED) -> None:
    proxy = Proxy(cfg)
    with open(applied_path(cfg), "w") as f:
        f.write(str(proxy.faults["generation"]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.reload)
        for route, port in cfg.routes.items():
            await nursery.start(proxy.serve_route, route, port)
        log.info("proxy: %d routes", len(cfg.routes))
        task_status.started()
