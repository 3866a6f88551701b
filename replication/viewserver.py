"""The view server: per replica group, the sequence of views (number, primary, backup).

`ViewService` is the pure state machine (time comes in as an argument, so each rule is
a fast unit test); `serve_viewserver` puts it on the wire and calls `tick` every ping
interval. The rules (6.033 L19 / the classic primary-backup view service):

- the first server to ping becomes primary of view 1; the next idle one becomes backup;
- a server that missed `dead_pings` pings is dead; a dead primary is replaced by the
  backup, and an idle server becomes the new backup (none: the primary serves alone and
  the group is *unprotected*);
- a server that pings with view 0 while it is primary or backup has restarted (lost its
  volatile state) and is treated as dead at once;
- the view does not change until the primary has acknowledged the current view (pinged
  with its number), even if that means waiting;
- only the primary or backup of view N can be primary of view N+1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from replfs.replication import wire

log = logging.getLogger("replfs.viewserver")


@dataclass(frozen=True)
class View:
    num: int = 0
    primary: str = ""
    backup: str = ""


@dataclass
class GroupState:
    view: View = field(default_factory=View)
    acked: bool = False
    last_ping: dict[str, float] = field(default_factory=dict)   # server -> time (insertion order = first seen)
    restarted: set[str] = field(default_factory=set)


class ViewService:
    def __init__(self, ping_interval: float = 0.1, dead_pings: int = 5):
        self.ping_interval = ping_interval
        self.dead_pings = dead_pings
        self.groups: dict[int, GroupState] = {}

    def _group(self, group: int) -> GroupState:
        return self.groups.setdefault(group, GroupState())

    def _dead(self, g: GroupState, server: str, now: float) -> bool:
        if server in g.restarted:
            return True
        t = g.last_ping.get(server)
        return t is None or now - t > self.dead_pings * self.ping_interval

    def ping(self, group: int, server: str, viewnum: int, now: float) -> View:
        """`server` of `group` pings, acknowledging `viewnum`; returns the current view."""
        g = self._group(group)
        g.last_ping[server] = now
        v = g.view
        if v.num == 0:
            g.view = View(1, server, "")
            g.acked = False
            log.info("group %d: view 1: primary %s (no backup)", group, server)
            return g.view
        if server == v.primary:
            if viewnum == v.num:
                g.acked = True
            elif viewnum == 0:
                g.restarted.add(server)
        elif server == v.backup and viewnum == 0:
            g.restarted.add(server)
        self._advance(group, g, now)
        return g.view

    def tick(self, now: float) -> None:
        for group, g in self.groups.items():
            self._advance(group, g, now)

    def get(self, group: int) -> View:
        return self._group(group).view

    def _idle(self, g: GroupState, now: float, exclude: set[str]) -> str:
        for s in g.last_ping:
            if s not in exclude and not self._dead(g, s, now):
                return s
        return ""

    def _advance(self, group: int, g: GroupState, now: float) -> None:
        if not g.acked:
            return
        v = g.view
        p, b = v.primary, v.backup
        removed: set[str] = set()
        if self._dead(g, p, now):
            if not b or self._dead(g, b, now):
                return          # nobody who holds the state is alive: wait
            removed.add(p)
            p, b = b, ""
        if b and self._dead(g, b, now):
            removed.add(b)
            b = ""
        if not b:
            b = self._idle(g, now, exclude=removed | {p})
        if (p, b) == (v.primary, v.backup):
            return
        g.view = View(v.num + 1, p, b)
        g.acked = False
        g.restarted -= removed
        log.info("group %d: view %d: primary %s, backup %s%s", group, g.view.num, p,
                 b or "(none)", "" if b else " -- unprotected")

    def status(self, now: float) -> dict:
        out = {}
        for group, g in self.groups.items():
            v = g.view
            out[str(group)] = dict(
                view=v.num, primary=v.primary, backup=v.backup, acked=g.acked,
                unprotected=bool(v.primary) and not v.backup,
                servers={s: dict(last_ping_ago=round(now - t, 3), dead=self._dead(g, s, now))
                         for s, t in g.last_ping.items()})
        return out


async def serve_viewserver(port: int, secret: bytes, service: ViewService,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `service` on 127.0.0.1:port until cancelled."""
    async def on_connection(ch: wire.Channel) -> None:
        while True:
            msg = await ch.receive()
            now = trio.current_time()
            if isinstance(msg, wire.Ping):
                if not (isinstance(msg.group, int) and isinstance(msg.server, str)
                        and isinstance(msg.view, int)):
                    raise wire.ProtocolError("malformed ping")
                v = service.ping(msg.group, msg.server, msg.view, now)
                await ch.send(_reply(service, msg.group, v))
            elif isinstance(msg, wire.GetView):
                if not isinstance(msg.group, int):
                    raise wire.ProtocolError("malformed get-view")
                await ch.send(_reply(service, msg.group, service.get(msg.group)))
            elif isinstance(msg, wire.StatusRequest):
                await ch.send(wire.StatusReply(dict(groups=service.status(now),
                                                    ping_interval=service.ping_interval,
                                                    dead_pings=service.dead_pings)))
            else:
                raise wire.ProtocolError(f"the view server does not take {msg.TAG}")

    async def ticker() -> None:
        while True:
            await trio.sleep(service.ping_interval)
            service.tick(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        port = await nursery.start(wire.serve, port, secret, on_connection)
        task_status.started(port)


def _reply(service: ViewService, group: int, v: View) -> wire.ViewReply:
    return wire.ViewReply(group, v.num, v.primary, v.backup, service._group(group).acked)
