"""The view server: per replica group, the sequence of views (number, primary, backup).

`ViewService` is the pure state machine (time comes in as an argument, so each rule is
a fast unit test); `serve_viewserver` puts it on the wire and calls `tick` every ping
interval, saving every change in a store (replication/viewstore.py) before answering;
`run_viewserver` is one process of several, active while the store elects it. The
rules (6.033 L19 / the classic primary-backup view service):

- the first server to ping becomes primary of view 1; the next idle one becomes backup;
- a server that missed `dead_pings` pings is dead, and so is one whose ping connection
  its end closed (its process died: the kernel closes its sockets) and that did not ping
  again within a ping interval (`hung_up`); a dead primary is replaced by the
  backup, and an idle server becomes the new backup (none: the primary serves alone and
  the group is *unprotected*);
- a view is given to one *incarnation* (process, the `boot` id of its pings) of each of
  its servers; a member that pings from another incarnation (or, without boot ids, pings
  view 0) has *restarted*: it lost its volatile state but not its disk, which holds
  everything it committed (primary) or acknowledged (backup). Its acknowledgement of
  the current view never counts;
- a restarted backup is removed from the view; a restarted primary hands over to its
  backup if that one is alive, in its own incarnation and in sync (view acknowledged),
  and otherwise is primary of the next view itself (given to its new incarnation): the
  primary holds the newest state, which is safe even in a view not yet acknowledged;
- the backup takes over (from a dead or restarted primary), and a dead or restarted
  backup is dropped by a primary that stays, only if the one that stays pinged within
  the last two ping intervals: else the two may have died together (the second is not
  yet dead when the first is), and the view server waits until it pings again, restarts
  or is dead;
- when both died (dead or restarted), the primary comes back as primary; the backup of
  an acknowledged view, restarted, only if the primary stays away for a grace period
  after the backup's return (it holds every acknowledged update, not the primary's
  newest);
- until then a restarted member is not told that view (it stays idle), unless it is
  the backup of a view not yet acknowledged;
- a restarted server that is not (or no longer) in the view is an ordinary idle server,
  and may be recruited as backup (it then gets a state transfer);
- the view does not change until the primary has acknowledged the current view (pinged
  with its number), even if that means waiting -- unless the primary restarted;
- only the primary or backup of view N can be primary of view N+1;
- a server that pings with `copy=False` holds no copy of its group's state (a replica
  made anew, replication/needscopy.py): it counts as dead for every choice of a
  primary (first server, takeover, resuming), and may be recruited as backup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import trio

from replfs.replication import wire
from replfs.replication.viewstore import Fenced, Unavailable

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
    boots: dict[str, str] = field(default_factory=dict)    # server -> its latest process's boot id
    given: dict[str, str] = field(default_factory=dict)    # member -> boot id the view was given to
    restarted: dict[str, float] = field(default_factory=dict)   # member -> when seen restarted
    # server -> when its ping connection was closed by its end (`hung_up`), until it pings again
    hung_up: dict[str, float] = field(default_factory=dict)
    # servers whose latest ping said they hold no copy of the group's state
    # (replication/needscopy.py): never made primary, may be recruited as backup
    no_copy: set[str] = field(default_factory=set)


class ViewService:
    """`save(views)` (optional) is called with {group: View} after every view change, so
    that a restarted view server can `restore` them (see `ping`)."""

    def __init__(self, ping_interval: float = 0.1, dead_pings: int = 5, save=None):
        self.ping_interval = ping_interval
        self.dead_pings = dead_pings
        self.groups: dict[int, GroupState] = {}
        self.save = save
        self.version = 0        # bumped by every change of a view or its acknowledgement

    @property
    def grace(self) -> float:
        """How long a group waits for its primary before a second choice takes over."""
        return 4 * self.dead_pings * self.ping_interval

    def restore(self, views: dict[int, View], now: float) -> None:
        """Start from the views a previous view server had (its servers keep their state
        on disk, so the last primary's state is the group's state)."""
        for group, v in views.items():
            if v.num:
                self.groups[group] = GroupState(view=v, acked=False, recovered_at=now)

    def resume(self, table: dict[int, dict], now: float) -> None:
        """Start from a store's table ({group: {num, primary, backup}}, and from etcd
        also {acked, given}). A record without `given` (views.json) is `restore`d; a
        whole one is taken as it stands, as if its members had just pinged: the previous
        view server process saved every change before telling anyone, so the view, its
        acknowledgement and the incarnations it was given to are exact, and a member
        that does not ping is dead after `dead_pings` intervals from now (no sooner:
        its lease from the previous process may still run)."""
        for group, r in table.items():
            v = View(int(r["num"]), str(r["primary"]), str(r["backup"]))
            if not v.num:
                continue
            if "given" not in r:
                self.restore({group: v}, now)
                continue
            given = {str(s): str(b) for s, b in dict(r["given"]).items()}
            members = [s for s in (v.primary, v.backup) if s]
            self.groups[group] = GroupState(view=v, acked=bool(r.get("acked")),
                                            last_ping={s: now for s in members},
                                            boots=dict(given), given=given)

    def table(self) -> dict[int, dict]:
        """What a store keeps: every group's view, acknowledgement and incarnations."""
        return {group: dict(num=g.view.num, primary=g.view.primary, backup=g.view.backup,
                            acked=g.acked, given=dict(g.given))
                for group, g in self.groups.items() if g.view.num}

    def _group(self, group: int) -> GroupState:
        return self.groups.setdefault(group, GroupState())

    def _dead(self, g: GroupState, server: str, now: float) -> bool:
        t = g.last_ping.get(server)
        if t is None or now - t > self.dead_pings * self.ping_interval:
            return True
        h = g.hung_up.get(server)
        return h is not None and now - h >= self.ping_interval

    def _fresh(self, g: GroupState, server: str, now: float) -> bool:
        """Pinged within the last two intervals, and did not hang up since: surely not
        killed with its partner."""
        t = g.last_ping.get(server)
        return t is not None and now - t <= 2 * self.ping_interval \
            and server not in g.hung_up

    def hung_up(self, group: int, server: str, boot: str, now: float) -> None:
        """The connection `server` (process `boot`) pinged on was closed by its end. A
        process that dies has its connections closed by its kernel at once; one that
        lives and gave up on a slow answer closes it too, but pings again on a new
        connection at once (and gives up its lease: server.py). So a server that hung
        up is dead once a ping interval passed without a ping -- not only after
        `dead_pings` missed ones (a hung process, which closes nothing, still waits
        for those). Only its latest incarnation's hang-up counts."""
        g = self.groups.get(group)
        if g is None or server not in g.last_ping:
            return
        if boot and g.boots.get(server, boot) != boot:
            return                      # an older process's connection
        g.hung_up.setdefault(server, now)

    def _stale(self, g: GroupState, server: str, viewnum: int, boot: str) -> bool:
        """A ping from a member of the view comes from another incarnation than the one
        the view was given to."""
        given = g.given.get(server) or g.boots.get(server)
        if boot and given:
            return boot != given
        # without boot ids a restart shows as a ping 0; but the primary of a view not
        # yet acknowledged pings 0 (or an older view) until it acknowledges
        return viewnum == 0 and not (server == g.view.primary and not g.acked)

    def ping(self, group: int, server: str, viewnum: int, now: float, boot: str = "",
             copy: bool = True) -> View:
        """`server` of `group` pings, acknowledging `viewnum`; returns the current view
        -- or View() to a restarted member while a view given to its previous
        incarnation stands (see `_hidden`). `boot` is the server process's id (optional:
        without it a ping 0 from a member is a restart). `copy` False: it holds no copy
        of the group's state yet (a replica made anew), so it is never made primary."""
        g = self._group(group)
        g.last_ping[server] = now
        g.hung_up.pop(server, None)
        if copy:
            g.no_copy.discard(server)
        else:
            g.no_copy.add(server)
        v = g.view
        if server in (v.primary, v.backup) and self._stale(g, server, viewnum, boot):
            if server not in g.restarted:
                log.info("group %d: %s restarted", group, server)
                g.restarted[server] = now
        if boot:
            g.boots[server] = boot
        if v.num == 0:
            if server not in g.no_copy:
                self._new_view(group, g, server, "", "first server")
            return g.view
        if g.recovered_at is not None:
            # after a view-server restart: the last primary resumes (its state is on
            # disk); its backup only if the primary stays away, and no one else ever
            if server in g.no_copy:
                pass
            elif server == v.primary or (server == v.backup and now - g.recovered_at > self.grace):
                g.recovered_at = None
                self._new_view(group, g, server, "", "resumes after a view-server restart")
            return g.view
        if server == v.primary and viewnum == v.num and server not in g.restarted \
                and not g.acked:
            g.acked = True
            self.version += 1
        self._advance(group, g, now)
        return View() if self._hidden(g, server) else g.view

    @staticmethod
    def _hidden(g: GroupState, server: str) -> bool:
        """A restarted member must not act on the view given to its previous incarnation
        while the view server waits to decide: as primary it would stream its state into
        a backup that may then be promoted half-overwritten, as backup of an acknowledged
        view take such a stream. Only the backup of a view not yet acknowledged is told
        (its primary must bring it up to date to acknowledge; it cannot be promoted)."""
        return server in g.restarted and (g.acked or server == g.view.primary)

    def stalled(self, seconds: float) -> None:
        """The view server itself did not run for `seconds` (overloaded machine): pings
        it could not receive meanwhile must not count as missed."""
        for g in self.groups.values():
            for s in g.last_ping:
                g.last_ping[s] += seconds
            for s in g.restarted:
                g.restarted[s] += seconds
            for s in g.hung_up:
                g.hung_up[s] += seconds

    def tick(self, now: float) -> None:
        for group, g in self.groups.items():
            if g.recovered_at is None and g.view.num:
                self._advance(group, g, now)

    def get(self, group: int) -> View:
        return self._group(group).view

    def _idle(self, g: GroupState, now: float, exclude: set[str]) -> str:
        for s in g.last_ping:
            if s not in exclude and not self._dead(g, s, now):
                return s
        return ""

    def _next_primary(self, g: GroupState, now: float) -> str:
        """Who is primary of the next view ("": wait, nobody may change the view now)."""
        p, b = g.view.primary, g.view.backup
        p_alive, b_alive = not self._dead(g, p, now), bool(b) and not self._dead(g, b, now)
        # a member that holds no copy (it came back made anew) counts as dead here
        p_alive, b_alive = p_alive and p not in g.no_copy, b_alive and b not in g.no_copy
        p_back = p_alive and p in g.restarted           # alive in a new incarnation
        b_ok = b_alive and b not in g.restarted         # alive in its own incarnation
        if not g.acked:
            # the backup may not hold the state yet; the primary, restarted, has its own
            return p if p_back else ""
        if p_alive and not p_back:
            if b and not b_ok and not self._fresh(g, p, now):
                return ""       # the backup died or restarted: did p die with it?
            return p
        if b_ok:
            # the backup is in sync: it takes over from a dead or restarted primary, if
            # it did not die with it (killed together, it is not dead yet when p is)
            return b if self._fresh(g, b, now) else ""
        if p_back:
            return p
        if b_alive and now - g.restarted[b] > self.grace:
            return b            # restarted, holds every acknowledged update; p stays away
        return ""               # nobody who holds the state is alive: wait

    def _advance(self, group: int, g: GroupState, now: float) -> None:
        v = g.view
        p = self._next_primary(g, now)
        if not p:
            return
        removed = {s for s in (v.primary, v.backup) if s and s != p}
        b = ""
        if p == v.primary and v.backup and v.backup not in g.restarted \
                and not self._dead(g, v.backup, now):
            b = v.backup
        if not b:
            # a removed server (dead, restarted, or the old primary) is not taken back
            # in the same step: it is recruited, as an idle server, in a later view
            b = self._idle(g, now, exclude=removed | {p})
        if (p, b) == (v.primary, v.backup) and p not in g.restarted:
            return
        self._new_view(group, g, p, b, "")

    def _new_view(self, group: int, g: GroupState, p: str, b: str, why: str) -> None:
        """Make view num+1 with primary `p` and backup `b`, given to their current
        incarnations."""
        g.view = View(g.view.num + 1, p, b)
        g.acked = False
        g.given = {s: g.boots.get(s, "") for s in (p, b) if s}
        g.restarted.clear()
        self.version += 1
        if self.save is not None:
            self.save({n: st.view for n, st in self.groups.items()})
        log.info("group %d: view %d: primary %s, backup %s%s%s", group, g.view.num, p,
                 b or "(none)", "" if b else " -- unprotected", f" ({why})" if why else "")

    def status(self, now: float) -> dict:
        out = {}
        for group, g in self.groups.items():
            v = g.view
            out[str(group)] = dict(
                view=v.num, primary=v.primary, backup=v.backup, acked=g.acked,
                unprotected=bool(v.primary) and not v.backup,
                servers={s: dict(last_ping_ago=round(now - t, 3), dead=self._dead(g, s, now),
                                 restarted=s in g.restarted, no_copy=s in g.no_copy)
                         for s, t in g.last_ping.items()})
        return out


async def serve_viewserver(port: int, secret: bytes, service: ViewService,
                           restore: dict[int, View] | None = None, *, store=None,
                           host: str = "127.0.0.1", name: str = "vs",
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `service` on host:port until cancelled, resuming from `restore`. With a
    `store` (replication/viewstore.py), every change of a view or of its acknowledgement
    is saved before anyone hears of it (one step at a time), and the server stops with
    `Fenced` once the store says this process is no longer the active view server."""
    if restore:
        service.restore(restore, trio.current_time())
    lock = trio.Lock()
    saved = [service.version]
    fenced: list[Exception] = []

    async def step(fn):
        """`fn()` on the service, its change saved before the answer leaves."""
        async with lock:
            if store is not None and not store.active():
                fenced.append(Fenced("the etcd lease may have run out"))
            if not fenced:
                out = fn()
                version = service.version
                if store is not None and version != saved[0]:
                    try:
                        await store.save(service.table())
                        saved[0] = version
                    except Fenced as exc:
                        fenced.append(exc)
            if fenced:
                scope.cancel()
                raise wire.ProtocolError("this view server is not active")
            return out

    async def on_connection(ch: wire.Channel) -> None:
        pinger = None       # (group, server, boot) of the pings on this connection
        while True:
            try:
                msg = await ch.receive()
            except BaseException as exc:
                if pinger is not None and wire.hung_up(exc):
                    await hung_up(*pinger)
                raise
            if isinstance(msg, wire.Ping):
                if not (isinstance(msg.group, int) and isinstance(msg.server, str)
                        and isinstance(msg.view, int)):
                    raise wire.ProtocolError("malformed ping")
                boot = msg.boot if isinstance(msg.boot, str) else ""
                pinger = (msg.group, msg.server, boot)
                copy = msg.copy if isinstance(msg.copy, bool) else True
                reply = await step(lambda: _reply(service, msg.group, service.ping(
                    msg.group, msg.server, msg.view, trio.current_time(), boot, copy)))
            elif isinstance(msg, wire.GetView):
                if not isinstance(msg.group, int):
                    raise wire.ProtocolError("malformed get-view")
                reply = await step(lambda: _reply(service, msg.group, service.get(msg.group)))
            elif isinstance(msg, wire.Watch):
                # a standby watches this process: the connection stays open, carrying
                # nothing, as long as this process serves (viewstore.py `_watch`)
                await ch.send(wire.Watching(name, getattr(store, "lease_id", None) or 0))
                await ch.receive()          # the watcher sends nothing: it left
                raise wire.ProtocolError("a watcher sent a message")
            elif isinstance(msg, wire.StatusRequest):
                others = await _running(store)
                reply = await step(lambda: wire.StatusReply(dict(
                    name=name, groups=service.status(trio.current_time()),
                    ping_interval=service.ping_interval, dead_pings=service.dead_pings,
                    running=others)))
            else:
                raise wire.ProtocolError(f"the view server does not take {msg.TAG}")
            await ch.send(reply)

    async def hung_up(group: int, server: str, boot: str) -> None:
        """A server's ping connection was closed by its end: dead unless it pings again
        within an interval -- decided then, not at the next tick."""
        log.info("group %d: %s closed its connection", group, server)
        await step(lambda: service.hung_up(group, server, boot, trio.current_time()))
        await trio.sleep(service.ping_interval)
        await step(lambda: service.tick(trio.current_time()))

    async def ticker() -> None:
        while True:
            t0 = trio.current_time()
            await trio.sleep(service.ping_interval)
            late = trio.current_time() - t0 - service.ping_interval
            if late > service.ping_interval:
                log.warning("the view server was stalled for %.2f s; not counting it "
                            "against the servers", late)
                service.stalled(late)
            try:
                await step(lambda: service.tick(trio.current_time()))
            except wire.ProtocolError:
                return

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            port = await nursery.start(partial(wire.serve, host=host), port, secret,
                                       on_connection)
            task_status.started(port)
    if fenced:
        raise fenced[0]


async def run_viewserver(port: int, secret: bytes, make_service, store, *,
                         host: str = "127.0.0.1", name: str = "vs",
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """One view server process: stand by until `store` elects it, then serve (listening
    on host:port only while active: a standby refuses connections, and the dialler tries
    the next view server), and stand by again when it loses the election. Resigns on
    the way out, so that a standby takes over at once."""
    task_status.started()
    try:
        while True:
            await store.lead()
            service = make_service()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store.keep, nursery.cancel_scope)
                    table = await store.load()
                    service.resume(table, trio.current_time())
                    log.info("%s: active, resuming from %d group(s): %s", name, len(table),
                             "; ".join(f"group {g}: view {r['num']} {r['primary']}/"
                                       f"{r['backup'] or '-'}" for g, r in table.items()))
                    await serve_viewserver(port, secret, service, store=store, host=host,
                                           name=name)
            except* (Fenced, Unavailable) as group:
                log.warning("%s: standing by: %s", name,
                            "; ".join(str(e) for e in group.exceptions))
            await store.resign()
            await trio.sleep(service.ping_interval)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(2):
                await store.resign()
        store.close()


async def _running(store) -> dict | None:
    """The view servers alive, by the store (None: it cannot tell)."""
    if store is None:
        return None
    try:
        with trio.move_on_after(1.0):
            return await store.running()
    except Exception as exc:        # etcd down: status says it cannot tell
        log.debug("the store cannot say which view servers run: %s", exc)
    return None


def _reply(service: ViewService, group: int, v: View) -> wire.ViewReply:
    return wire.ViewReply(group, v.num, v.primary, v.backup, service._group(group).acked)
