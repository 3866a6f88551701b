"""A replica server (`replfs server DIR --name S`): one array, one log, one filesystem.

Roles follow the view server: the primary's side is in replication/primary.py
(`PrimaryRole`: executing operations, forwarding to the backup, state transfer), the
backup's in replication/backup.py (`BackupRole`: applying the primary's stream). This
module holds what is common: the lifecycle, the view (pings, promotion, demotion) and
the connections.

A server that is not primary of the current view completes no update: an update is
answered only after the backup acknowledged it, and a backup that learnt of a newer view
refuses the old primary's forwards; a primary that has not heard from the view server
for DeadPings x PingInterval stops answering altogether (so its clients go and ask the
view server).

On promotion the server reopens its filesystem (the in-memory allocation maps of a
backup are stale) without reclaiming orphans -- clients may still hold unlinked open
files; orphans are reclaimed only by the primary of view 1 (a fresh cluster start).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets

import trio

from replfs.fs.mkfs import open_fs
from replfs.raid.healing import HealingDevice
from replfs.raid.jobs import ArrayJobs
from replfs.replication import amo, needscopy, postop, wire
from replfs.replication.arrayops import ArrayOp, ArrayOpsRole
from replfs.replication.backup import FLUSH_BEHIND, BackupRole
from replfs.replication.heal import HealRole
from replfs.replication.config import ClusterConfig
from replfs.replication.dirtymap import DirtyMap
from replfs.replication.primary import (READS, UPDATES, Gate, Inflight, NotPrimaryError,
                                        Primary, PrimaryRole)
from replfs.replication.twopc import TX_METHODS, TwoPhase
from replfs.replication.viewserver import View
from replfs.replication.vsdial import ViewServers

log = logging.getLogger("replfs.server")


class ReplicaServer(PrimaryRole, BackupRole, HealRole, ArrayOpsRole):
    def __init__(self, cfg: ClusterConfig, name: str, array):
        self.cfg = cfg
        self.name = name
        self.group = cfg.group_of(name)
        self.secret = cfg.secret()
        self.viewservers = ViewServers(cfg, name, self.secret)
        self.array = array
        # the filesystem's device: the array, with unreadable blocks healed from the
        # partner replica (replication/heal.py)
        self.device = HealingDevice(array, self._heal)
        # background rebuild and scrub of the array (replication/arrayops.py); what a
        # scrub finds beyond repair is healed as reads heal it (replication/heal.py)
        self.jobs = ArrayJobs(array, heal=self._scrub_heal)
        self.fs = None
        self.dirtymap: DirtyMap | None = None     # opened by `run`
        self.view = View()
        self.ping_view = 0          # the view number we acknowledge in pings
        self.role = "idle"
        self.primary: Primary | None = None
        self.serving = False
        self.last_vs_contact = -1e9
        # as a backup: per replication connection, when a message on it last renewed
        # the primary's lease; it does not serve as primary before those ran out
        # (primary.py `_replicate`). A connection its end closed takes its grant along:
        # a primary gives up the lease whenever its link closes (primary.py `_link`)
        self.lease_grants: dict[wire.Channel, float] = {}
        self._ping_now = trio.Event()       # set: the pinger pings at once
        self.gate = Gate()
        self.apply_lock = trio.Lock()
        self._changed = trio.Event()
        self._inflight: dict[tuple, Inflight] = {}
        self._view_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.backup_synced = False
        self.position = ("", 0)
        self.needs_copy = False     # needscopy.py: no primary role before a full copy
        self.sync_incarnation = ""
        self.sync_progress = (0, 0)
        self.sync_kind = ""         # as a backup: the transfer being received
        self.applied_lsn = 0
        self._applyq: list = []
        self._applyq_event = trio.Event()
        self._applying = False      # a task is applying the queue (backup.py)
        self._queued_bytes = 0
        self._received = 0
        self._applied = 0
        self._q_synced = False
        self._q_inc = ""
        self.stats = dict(ops=0, duplicates=0, forwarded_batches=0, applied_batches=0,
                          transfers_full=0, transfers_dirty=0, transfers_merged=0,
                          blocks_transferred=0,
                          refused_forwards=0, execute_seconds=0.0, ack_wait_seconds=0.0,
                          forward_seconds=0.0, healed_blocks=0, unhealed_reads=0,
                          heals_served=0, last_transfer={})
        self.lease = cfg.dead_pings * cfg.ping_interval
        # "forced": every operation is forced on both replicas before it is answered;
        # "written" (the default): written on both, forced within FLUSH_BEHIND
        self.forced = cfg.durability == "forced"
        self.boot = secrets.token_hex(8)
        self.twopc = TwoPhase(self)
        self._unforced_position: tuple[str, int] | None = None
        self._position_seq = 0      # applies that set a position, counted
        self._forced_seq = 0        # the count of the one `position` is from
        self._lost_files: tuple[tuple, dict] | None = None   # (lost set, its owners)
        self._apply_dirty = trio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.dirtymap = DirtyMap(os.path.join(self.array.dir, "dirty.map"), self.array.nblocks)
        self.needs_copy = needscopy.marked(self.array.dir)
        if self.needs_copy:
            # its marks describe a state this replica no longer holds
            self.dirtymap.invalidate()
            log.warning("%s needs a full copy from its partner (%s): it serves as backup "
                        "only until it has one", self.name, needscopy.NAME)
        self.fs = await open_fs(self.device, reclaim=False)
        self.position = await self._read_position()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                me = self.cfg.direct(self.name)       # the address the description gives
                port = await nursery.start(functools.partial(
                    wire.serve, me[1], self.secret, self._on_connection, host=me[0]))
                await self.twopc.start(nursery)
                await nursery.start(self.jobs.run)
                nursery.start_soon(self._pinger)
                nursery.start_soon(self._applier)
                nursery.start_soon(self._backup_flusher)
                log.info("server %s (group %d) listening on %d", self.name, self.group, port)
                task_status.started(port)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._drain_applyq()
                finally:
                    await self.fs.close()
                    self.dirtymap.close()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---------------------------------------------------------------- view
    async def _pinger(self) -> None:
        ch = None
        interval = self.cfg.ping_interval
        while True:
            t0 = trio.current_time()
            try:
                if ch is None:
                    ch = await self.viewservers.connect(interval * 3)
                sent = trio.current_time()
                with trio.fail_after(interval * 3):
                    await ch.send(wire.Ping(self.group, self.name, self.ping_view, self.boot,
                                            not self.needs_copy))
                    reply = await ch.receive()
                if not isinstance(reply, wire.ViewReply):
                    raise wire.ProtocolError(f"view server sent {reply.TAG}")
                # the lease runs from when the ping left, not when its answer came:
                # an answer delayed in a busy view server or network must not stretch it
                self.last_vs_contact = sent
                await self._on_view(View(reply.num, reply.primary, reply.backup))
            except wire.CONN_ERRORS as exc:
                if ch is not None:
                    # the view server takes a closed ping connection for a death once
                    # no ping follows within an interval (viewserver.py `hung_up`): give
                    # up the lease its answers gave before closing it
                    self.last_vs_contact = -1e9
                    await ch.aclose()
                    ch = None
                    self.viewservers.failed()
                log.debug("ping failed: %s", exc)
            with trio.move_on_at(t0 + interval):
                await self._ping_now.wait()
            self._ping_now = trio.Event()

    def _ping_soon(self, delay: float) -> None:
        """Ping the view server `delay` seconds from now (besides every interval)."""
        async def later():
            await trio.sleep(delay)
            self._ping_now.set()
        self._nursery.start_soon(later)

    async def _on_view(self, v: View) -> None:
        if v.num <= self.view.num:
            return
        self.view = v
        log.info("view %d: primary %s, backup %s (I am %s)", v.num, v.primary,
                 v.backup or "-", "primary" if v.primary == self.name else
                 "backup" if v.backup == self.name else "idle")
        if v.primary == self.name and self.needs_copy:
            # never primary with a state that may lack acknowledged updates: the group
            # waits for the partner (the view stays unacknowledged)
            if self.role != "refusing":
                log.error("view %d makes %s primary, but it holds no copy of its group's "
                          "state yet (%s): not serving; start its partner", v.num,
                          self.name, needscopy.NAME)
            self.role = "refusing"
            self._notify()
            return
        if v.primary == self.name:
            if self.role != "primary":
                await self._promote(v)
            self._start_view_task(v)
        else:
            if self.role == "primary":
                await self._demote()
            self.role = "backup" if v.backup == self.name else "idle"
            self.ping_view = v.num
        self._notify()

    async def _promote(self, v: View) -> None:
        self.serving = False
        await self._wait_applied()      # everything the backup acknowledged, applied
        async with self.apply_lock:
            await self.fs.close()
            if v.num == 1:      # reclaiming orphans commits before the map sees commits
                self.dirtymap.invalidate()
            self.fs = await open_fs(self.device, reclaim=(v.num == 1), history=self._recorder())
        self.dirtymap.settle()
        self.dirtymap.promoted(self.position)   # the old primary's state, up to here
        self.fs.mgr.on_append = self._mark_dirty
        # The stream to the backup carries each commit as soon as it is appended, so
        # the primary's own log write and the round trip to the backup overlap.
        self.fs.mgr.publish_at_append = True
        # commits are written, not forced, unless every operation is: force within
        # FLUSH_BEHIND (the task ends when this manager closes)
        self._nursery.start_soon(self.fs.mgr.flush_behind, FLUSH_BEHIND)
        table = amo.AmoTable(self.array.nblocks)
        await table.load(self.fs.mgr)
        # one ordered stream: the manager publishes its records into it, and fsync
        # adds its markers in their place (primary.py `execute`)
        send, recv = trio.open_memory_channel(float("inf"))
        self.primary = Primary(secrets.token_hex(8), table, recv)
        self.primary.stream = send
        self.fs.frees_settled = self._frees_settled
        self.fs.mgr.subscribe_into(send)
        self.role = "primary"
        self.backup_synced = False
        log.info("promoted to primary of view %d (incarnation %s)", v.num,
                 self.primary.incarnation)
        await self.twopc.on_promote(self.primary)

    def _frees_settled(self, lsn: int) -> bool:
        """A commit's freeing of blocks can no longer be taken back: forced here and, with
        a backup, on the backup too (a block it frees is written in place by its next
        owner on both replicas: fs/core.py, ordered mode)."""
        p = self.primary
        if p is None or self.fs.mgr.log.durable_lsn <= lsn:
            return False
        return not self.view.backup or p.backup_durable >= lsn

    def _recorder(self):
        """`REPLFS_HISTORY_DIR`: a primary streams its history there (tests check the
        whole cluster's histories for serializability, txn/history.py merge_streams)."""
        d = os.environ.get("REPLFS_HISTORY_DIR")
        if not d:
            return None
        from replfs.txn.history import HistoryRecorder
        return HistoryRecorder(stream=os.path.join(
            d, f"g{self.group}-{self.name}-{self.boot}-{self.view.num}.hist"))

    def confirm(self, txn_id: int) -> None:
        """The transaction's commit survives: the backup held it before we answered."""
        h = self.fs.mgr.history if self.fs is not None else None
        if h is not None:
            h.confirm(txn_id)

    async def _demote(self) -> None:
        log.warning("no longer primary (view %d)", self.view.num)
        h, self.fs.mgr.history = self.fs.mgr.history, None     # a backup records nothing
        self.fs.mgr.on_append = None
        if h is not None:
            h.close()
        self.serving = False
        if self._view_scope is not None:
            self._view_scope.cancel()
        if self.primary is not None:
            # the manager drops its subscription at its next record; waiting fsyncs
            # see the role gone
            self.primary.commits.close()
        self.primary = None
        self.twopc.on_demote()
        self.role = "idle"
        self.backup_synced = False
        # in-flight operations finish (and fail) before we accept a backup's forwards
        await self.gate.close()
        await self.gate.open()

    def _start_view_task(self, v: View) -> None:
        if self._view_scope is not None:
            self._view_scope.cancel()
        scope = trio.CancelScope()
        self._view_scope = scope

        async def run():
            with scope:
                await self._replicate(v)
        self._nursery.start_soon(run)

    async def _refresh_view(self) -> None:
        try:
            r = await self.viewservers.ask(wire.GetView(self.group), self.cfg.ping_interval * 3)
            if isinstance(r, wire.ViewReply):
                await self._on_view(View(r.num, r.primary, r.backup))
        except wire.CONN_ERRORS:
            pass

    # ---------------------------------------------------------------- connections
    async def _on_connection(self, ch: wire.Channel) -> None:
        """Operations run concurrently (one task each); replication-link messages are
        handled in order, one at a time."""
        link = {wire.SyncStart: self._on_sync_start, wire.Forward: self._on_forward,
                wire.Snapshot: self._on_snapshot, wire.SyncDone: self._on_sync_done,
                wire.Flush: self._on_flush, wire.Renew: self._on_renew}
        other = {wire.HealRequest: self._on_heal_request, ArrayOp: self._on_array_op}
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    msg = await ch.receive()
                except BaseException as exc:
                    if wire.hung_up(exc) and self.lease_grants.pop(ch, None) is not None:
                        # our primary closed its link, or died: it gave up the lease its
                        # messages on it renewed. If it died, the view server decides so
                        # within a ping interval (viewserver.py `hung_up`): ask then
                        self._ping_soon(1.2 * self.cfg.ping_interval)
                    raise
                handler = link.get(type(msg))
                if handler is not None:
                    _check_link(msg)
                    await handler(ch, msg)
                elif type(msg) in other:
                    await other[type(msg)](ch, msg)
                elif isinstance(msg, wire.OpRequest):
                    _check_op(msg)
                    nursery.start_soon(self._serve_op, ch, msg)
                elif isinstance(msg, wire.StatusRequest):
                    st = self.status()
                    if st["lost_blocks"]:
                        st["lost_files"] = await self.lost_files()
                    await ch.send(wire.StatusReply(st))
                elif isinstance(msg, wire.CrashAt) and isinstance(msg.spec, str):
                    from replfs import crash
                    crash.arm(msg.spec)
                    log.warning("crash points armed: %s", msg.spec)
                    await ch.send(wire.StatusReply({"armed": msg.spec}))
                else:
                    raise wire.ProtocolError(f"a server does not take {msg.TAG}")

    async def _serve_op(self, ch: wire.Channel, msg: wire.OpRequest) -> None:
        """Execute `msg` and answer it; the answer to an update that succeeded carries
        the attributes of the inodes it changed here, read once it committed and the
        backup held it (replication/postop.py)."""
        try:
            value, err, text = await self.execute(msg)
            attrs = []
            if not err and msg.method in UPDATES and self.role == "primary":
                attrs = await postop.attrs_after(self.fs, self.group, msg.method, msg.args)
            reply = wire.OpReply(msg.rid, value, err, text, attrs)
        except NotPrimaryError as exc:
            reply = wire.NotPrimary(msg.rid, self.view.num, str(exc))
        except (TypeError, ValueError, wire.ProtocolError) as exc:
            log.warning("bad request %s from %s: %s", msg.method, ch.peer, exc)
            reply = wire.OpReply(msg.rid, None, 22, f"bad request: {exc}")
        except OSError as exc:
            log.error("%s failed: %s", msg.method, exc)
            reply = wire.OpReply(msg.rid, None, exc.errno or 5, str(exc))
        try:
            await ch.send(reply)
        except wire.CONN_ERRORS:
            pass

    def status(self) -> dict:
        import psutil
        proc = psutil.Process()
        p = self.primary
        mgr = self.fs.mgr if self.fs is not None else None
        out = dict(name=self.name, group=self.group, role=self.role, pid=os.getpid(),
                   view=self.view.num, serving=self.serving, acked_view=self.ping_view,
                   cpu_percent=proc.cpu_percent(interval=None),
                   rss=proc.memory_info().rss, stats=dict(self.stats),
                   array=_array_summary(self.array),
                   txn=mgr.stats() if mgr is not None else {},
                   backup_synced=self.backup_synced,
                   lost_blocks=list(self.device.lost),
                   array_job=self.jobs.status(),
                   **self.twopc.status())
        if p is not None:
            out.update(incarnation=p.incarnation, committed_lsn=p.committed_lsn,
                       acked_lsn=p.acked_lsn, lag_bytes=max(0, p.committed_lsn - p.acked_lsn),
                       sync_progress=list(p.sync_progress), sync_kind=p.sync_kind,
                       dirty_blocks=len(self.dirtymap),
                       dirty_base=list(self.dirtymap.base) if self.dirtymap.base else None)
        else:
            out.update(position=list(self.position), sync_kind=self.sync_kind,
                       sync_progress=list(getattr(self, "sync_progress", (0, 0))))
        return out


def _array_summary(array) -> dict:
    try:
        st = array.status()
    except Exception as exc:        # status must never take the server down
        return dict(health=f"unknown ({exc})")
    disks = st.get("disks", [])
    return dict(health=st.get("health", array.health()),
                disks_ok=sum(1 for d in disks if d.get("state") == "active"),
                disks=len(disks),
                repaired=sum(int(d.get("cksum_errors", 0) or 0) for d in disks),
                checksum_cache=st.get("checksum_cache"))


def _check_op(msg: wire.OpRequest) -> None:
    if not (isinstance(msg.rid, int) and isinstance(msg.client, str) and isinstance(msg.lane, int)
            and isinstance(msg.seq, int) and isinstance(msg.method, str)
            and isinstance(msg.args, list) and isinstance(msg.kwargs, dict)
            and all(isinstance(k, str) for k in msg.kwargs)):
        raise wire.ProtocolError("malformed op request")
    if (msg.method not in UPDATES and msg.method not in READS and msg.method != "fsync"
            and msg.method not in TX_METHODS):
        raise wire.ProtocolError(f"unknown method {msg.method!r}")


def _check_link(msg) -> None:
    if not (isinstance(msg.view, int) and isinstance(msg.primary, str)):
        raise wire.ProtocolError(f"malformed {msg.TAG}")
    if isinstance(msg, wire.Forward):
        ok = isinstance(msg.records, list) and msg.records and all(
            isinstance(r, list) and len(r) == 5 and isinstance(r[0], int) and isinstance(r[1], list)
            and all(isinstance(c, list) and len(c) in (3, 4) and isinstance(c[0], int)
                    and isinstance(c[1], int) and isinstance(c[2], bytes)
                    and (len(c) == 3 or c[3] == 1) for c in r[1])
            and r[2] in ("commit", "prepare", "abort") and (r[3] is None or isinstance(r[3], dict))
            and isinstance(r[4], list)
            for r in msg.records)
    elif isinstance(msg, wire.Snapshot):
        ok = isinstance(msg.blocks, list) and all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[0], int)
            and isinstance(b[1], bytes) and len(b[1]) == 4096 for b in msg.blocks)
    elif isinstance(msg, wire.Flush):
        ok = isinstance(msg.lsn, int)
    elif isinstance(msg, wire.Renew):
        ok = True
    else:
        ok = isinstance(msg.incarnation, str)
    if not ok:
        raise wire.ProtocolError(f"malformed {msg.TAG}")
