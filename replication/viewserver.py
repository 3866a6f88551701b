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
    recovered_at: float | None = None   # the view came from the state file, not from pings
    last_ping: dict[str, float] = field(default_factory=dict)   # server -> time (insertion order = first seen)
    restarted: set[str] = field(default_factory=set)
    boots: dict[str, str] = field(default_factory=dict)    # server -> its process's boot id


class ViewService:
    """`save(views)` (optional) is called with {group: View} after every view change, so
    that a restarted view server can `restore` them (see `ping`)."""

    def __init__(self, ping_interval: float = 0.1, dead_pings: int = 5, save=None):
        self.ping_interval = ping_interval
        self.dead_pings = dead_pings
        self.groups: dict[int, GroupState] = {}
        self.save = save

    def restore(self, views: dict[int, View], now: float) -> None:
        """Start from the views a previous view server had (its servers keep their state
        on disk, so the last primary's state is the group's state)."""
        for group, v in views.items():
            if v.num:
                self.groups[group] = GroupState(view=v, acked=False, recovered_at=now)

    def _changed(self) -> None:
        if self.save is not None:
            self.save({g: st.view for g, st in self.groups.items()})

    def _group(self, group: int) -> GroupState:
        return self.groups.setdefault(group, GroupState())

    def _dead(self, g: GroupState, server: str, now: float) -> bool:
        if server in g.restarted:
            return True
        t = g.last_ping.get(server)
        return t is None or now - t > self.dead_pings * self.ping_interval

    def ping(self, group: int, server: str, viewnum: int, now: float, boot: str = "") -> View:
        """`server` of `group` pings, acknowledging `viewnum`; returns the current view.
        With `boot` (the server process's id), a ping 0 counts as a restart only from a
        new process."""
        g = self._group(group)
        g.last_ping[server] = now
        seen = g.boots.get(server)
        if boot:
            g.boots[server] = boot
        restart = viewnum == 0 and not (boot and seen in (None, boot))
        v = g.view
        if v.num == 0:
            g.view = View(1, server, "")
            g.acked = False
            log.info("group %d: view 1: primary %s (no backup)", group, server)
            self._changed()
            return g.view
        if g.recovered_at is not None:
            # after a view-server restart: the last primary resumes (its state is on
            # disk); its backup only if the primary stays away, and no one else ever
            grace = 4 * self.dead_pings * self.ping_interval
            if server == v.primary or (server == v.backup and now - g.recovered_at > grace):
                g.view = View(v.num + 1, server, "")
                g.acked = False
                g.recovered_at = None
                g.restarted.clear()
                log.info("group %d: view %d: primary %s resumes after a view-server restart",
                         group, g.view.num, server)
                self._changed()
            return g.view
        if server == v.primary:
            if viewnum == v.num:
                g.acked = True
            elif restart:
                g.restarted.add(server)
        elif server == v.backup and restart:
            g.restarted.add(server)
        self._advance(group, g, now)
        return g.view

    def stalled(self, seconds: float) -> None:
        """The view server itself did not run for `seconds` (overloaded machine): pings
        it could not receive meanwhile must not count as missed."""
        for g in self.groups.values():
            for s in g.last_ping:
                g.last_ping[s] += seconds

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
        self._changed()
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
                           restore: dict[int, View] | None = None,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `service` on 127.0.0.1:port until cancelled, resuming from `restore`."""
    if restore:
        service.restore(restore, trio.current_time())
    async def on_connection(ch: wire.Channel) -> None:
        while True:
            msg = await ch.receive()
            now = trio.current_time()
            if isinstance(msg, wire.Ping):
                if not (isinstance(msg.group, int) and isinstance(msg.server, str)
                        and isinstance(msg.view, int)):
                    raise wire.ProtocolError("malformed ping")
                v = service.ping(msg.group, msg.server, msg.view, now,
                                 msg.boot if isinstance(msg.boot, str) else "")
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
            t0 = trio.current_time()
            await trio.sleep(service.ping_interval)
            late = trio.current_time() - t0 - service.ping_interval
            if late > service.ping_interval:
                log.warning("the view server was stalled for %.2f s; not counting it "
                            "against the servers", late)
                service.stalled(late)
            service.tick(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        port = await nursery.start(wire.serve, port, secret, on_connection)
        task_status.started(port)


def _reply(service: ViewService, group: int, v: View) -> wire.ViewReply:
    return wire.ViewReply(group, v.num, v.primary, v.backup, service._group(group).acked)


def load_views(path: str) -> dict[int, View]:
    import json
    try:
        with open(path) as f:
            d = json.load(f)
        return {int(g): View(int(v[0]), str(v[1]), str(v[2])) for g, v in d.items()}
    except (FileNotFoundError, ValueError, TypeError, IndexError):
        return {}


def saver(path: str):
    """A `save` callback writing the views to `path` atomically."""
    import json
    import os

    def save(views: dict[int, View]) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({str(g): [v.num, v.primary, v.backup] for g, v in views.items()}, f)
        # no fsync: it could stall the pings for long under load (a view server crash
        # is not a power loss; and the views only pick who resumes)
        os.replace(tmp, path)
    return save
