"""A replica server (`replfs server DIR --name S`): one array, one log, one filesystem.

Roles follow the view server. As **primary** the server executes each client operation
as a transaction with `current_request` set (fs/core.py), records the reply in the
at-most-once table inside that same transaction (replication/amo.py), and answers only
once its backup has acknowledged the transaction (or the view has no backup). A single
forwarding task reads the transaction manager's commit stream (`mgr.subscribe()`, commit
order) and ships batches of commit records (their byte-range after-images) to the
backup; the backup answers `Ack(lsn)` as soon as it holds a batch and applies batches in
order in the background, several batches per local transaction, lazily (forced within
FLUSH_BEHIND). The stream carries each commit as soon as it is appended, so the
primary's force and the round trip to the backup overlap: an acknowledged update is
durable on the primary and held by the backup (it survives the crash of either; should
both die at once, the primary's disk has it, but the view server may hand the group to
the restarted backup, whose disk can lack the last FLUSH_BEHIND of them); `fsync`
additionally sends `Flush` and returns once the backup has forced everything it received.

State transfer to a new backup runs inside that same ordered stream: the primary
computes a plan (every allocated logical block, or only the blocks changed since the
backup was last in sync), and for each chunk briefly closes the *gate* that update
operations pass (so no transaction is live and the cache holds committed state only),
drains the commit stream, reads the chunk, reopens the gate and sends the chunk after the
forwards it already includes. Updates keep flowing between chunks. Only after
`SyncDone` does the primary acknowledge the view, so a backup that does not yet hold
the state can never be promoted.

A backup that comes back after a short absence: the primary remembers the blocks changed
since the backup's last acknowledged batch (a dirty set, kept while the backup is away);
the backup reports its durable position (the primary's incarnation id and the LSN of the
last batch it applied, stored in its own position block in the same transaction as the
batch), and if it is in the current incarnation only the dirty blocks are sent.

As **backup** it rejects client operations, and forwards from anyone but the primary of
the view it knows. A server that is not primary of the current view completes no update:
an update is answered only after the backup acknowledged it, and a backup that learnt of
a newer view refuses the old primary's forwards; a primary that has not heard from the
view server for DeadPings x PingInterval stops answering altogether (so its clients go
and ask the view server).

On promotion the server reopens its filesystem (the in-memory allocation maps of a
backup are stale) without reclaiming orphans -- clients may still hold unlinked open
files; orphans are reclaimed only by the primary of view 1 (a fresh cluster start).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field

import trio

from replfs.fs.core import Request, current_request
from replfs.fs.errors import ForeignInode, FsError
from replfs.fs.mkfs import open_fs
from replfs.replication import amo, wire
from replfs.replication.config import VIEWSERVER, ClusterConfig
from replfs.replication.twopc import DISTRIBUTED, TX_METHODS, TwoPhase
from replfs.replication.viewserver import View
from replfs.txn.records import tuplify

log = logging.getLogger("replfs.server")

UPDATES = frozenset({"setattr", "mknod", "create", "mkdir", "symlink", "link", "unlink",
                     "rmdir", "forget", "rename", "write", "setxattr", "removexattr"})
READS = frozenset({"lookup", "getattr", "readlink", "read", "readdir", "statfs",
                   "getxattr", "listxattr", "entry", "dir_info"})
CHUNK = 64                  # blocks per state-transfer message
ACK_TIMEOUT = 5.0
FORWARD_MAX = 2**20     # bytes of after-images per forward batch
APPLY_MAX = 2**20       # bytes of after-images per backup transaction
QUEUE_MAX = 16 * 2**20  # bytes a backup holds unapplied before it stops reading
FLUSH_BEHIND = 0.1      # seconds a backup's applied batches may stay off its disk (its
                        # window if both replicas of a group die at once)


class NotPrimaryError(Exception):
    pass


class LinkError(Exception):
    pass


class Gate:
    """Update operations pass the gate concurrently (`passing`); a state-transfer chunk
    closes it (`closed`) once every operation inside has left. Waiting closers go first."""

    def __init__(self):
        self._cond = trio.Condition()
        self.inside = 0
        self.closing = 0
        self.shut = False

    async def enter(self) -> None:
        async with self._cond:
            while self.shut or self.closing:
                await self._cond.wait()
            self.inside += 1

    async def leave(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._cond:
                self.inside -= 1
                self._cond.notify_all()

    async def close(self) -> None:
        async with self._cond:
            self.closing += 1
            try:
                while self.inside or self.shut:
                    await self._cond.wait()
            finally:
                self.closing -= 1
            self.shut = True

    async def open(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._cond:
                self.shut = False
                self._cond.notify_all()


@dataclass
class Primary:
    """What a server holds while it is primary (one incarnation)."""
    incarnation: str
    table: amo.AmoTable
    commits: trio.MemoryReceiveChannel
    committed_lsn: int = 0
    acked_lsn: int = 0
    backup_synced: bool = False
    dirty: set | None = None        # blocks changed since `dirty_base` (None: unknown)
    dirty_base: int = -1
    unacked: list | None = None     # [(lsn, blocks)] sent, not yet durable on the backup
    backup_durable: int = 0
    markers: list = field(default_factory=list)     # fsyncs waiting for the backup's flush
    pump: trio.CancelScope | None = None
    stream: trio.MemorySendChannel | None = None
    sync_progress: tuple[int, int] = (0, 0)


class _Inflight:
    """An update being executed; retransmissions wait for its result."""

    def __init__(self):
        self.done = trio.Event()
        self.result = None


class ReplicaServer:
    def __init__(self, cfg: ClusterConfig, name: str, array):
        self.cfg = cfg
        self.name = name
        self.group = cfg.group_of(name)
        self.secret = cfg.secret()
        self.array = array
        self.fs = None
        self.view = View()
        self.ping_view = 0          # the view number we acknowledge in pings
        self.role = "idle"
        self.primary: Primary | None = None
        self.serving = False
        self.last_vs_contact = -1e9
        self.gate = Gate()
        self.apply_lock = trio.Lock()
        self._changed = trio.Event()
        self._inflight: dict[tuple, _Inflight] = {}
        self._view_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.backup_synced = False
        self.position = ("", 0)
        self.sync_incarnation = ""
        self.sync_progress = (0, 0)
        self.applied_lsn = 0
        self._applyq: list = []
        self._applyq_event = trio.Event()
        self._queued_bytes = 0
        self._received = 0
        self._applied = 0
        self._q_synced = False
        self._q_inc = ""
        self.stats = dict(ops=0, duplicates=0, forwarded_batches=0, applied_batches=0,
                          transfers_full=0, transfers_dirty=0, blocks_transferred=0,
                          refused_forwards=0, execute_seconds=0.0, ack_wait_seconds=0.0,
                          forward_seconds=0.0)
        self.lease = cfg.dead_pings * cfg.ping_interval
        self.boot = secrets.token_hex(8)
        self.twopc = TwoPhase(self)
        self._unforced_position: tuple[str, int] | None = None
        self._apply_dirty = trio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.fs = await open_fs(self.array, reclaim=False)
        self.position = await self._read_position()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                port = await nursery.start(wire.serve, self.cfg.ports[self.name], self.secret,
                                           self._on_connection)
                await self.twopc.start(nursery)
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
                    with trio.fail_after(interval * 3):
                        ch = await wire.connect(self.cfg.addr(self.name, VIEWSERVER),
                                                self.secret, self.name)
                with trio.fail_after(interval * 3):
                    await ch.send(wire.Ping(self.group, self.name, self.ping_view, self.boot))
                    reply = await ch.receive()
                if not isinstance(reply, wire.ViewReply):
                    raise wire.ProtocolError(f"view server sent {reply.TAG}")
                self.last_vs_contact = trio.current_time()
                await self._on_view(View(reply.num, reply.primary, reply.backup))
            except wire.CONN_ERRORS as exc:
                if ch is not None:
                    await ch.aclose()
                    ch = None
                log.debug("ping failed: %s", exc)
            await trio.sleep(max(0.0, interval - (trio.current_time() - t0)))

    async def _on_view(self, v: View) -> None:
        if v.num <= self.view.num:
            return
        self.view = v
        log.info("view %d: primary %s, backup %s (I am %s)", v.num, v.primary,
                 v.backup or "-", "primary" if v.primary == self.name else
                 "backup" if v.backup == self.name else "idle")
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
            self.fs = await open_fs(self.array, reclaim=(v.num == 1), history=self._recorder())
        # The stream to the backup carries each commit as soon as it is appended, so
        # the primary's own force and the round trip to the backup overlap.
        self.fs.mgr.publish_at_append = True
        table = amo.AmoTable(self.array.nblocks)
        await table.load(self.fs.mgr)
        send, recv = trio.open_memory_channel(float("inf"))
        self.primary = Primary(secrets.token_hex(8), table, recv)
        self.primary.stream = send
        self.primary.pump = trio.CancelScope()
        self._nursery.start_soon(self._pump, self.fs.mgr.subscribe(), send, self.primary.pump)
        self.role = "primary"
        self.backup_synced = False
        log.info("promoted to primary of view %d (incarnation %s)", v.num,
                 self.primary.incarnation)
        await self.twopc.on_promote(self.primary)

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
        if h is not None:
            h.close()
        self.serving = False
        if self._view_scope is not None:
            self._view_scope.cancel()
        if self.primary is not None:
            self.primary.pump.cancel()
            self.primary.commits.close()     # waiting fsyncs see the role gone
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

    # ---------------------------------------------------------------- primary: replication
    async def _replicate(self, v: View) -> None:
        p = self.primary
        if p.unacked is not None or p.backup_synced:
            self._lost_backup(p)
        if not v.backup:
            # everything consumed from the commit stream so far is as acknowledged as
            # it can be: there is nobody to wait for
            p.acked_lsn = max(p.acked_lsn, p.committed_lsn)
            self.serving = True
            self._notify()
            self.ping_view = v.num
            log.warning("serving alone in view %d: the group is unprotected", v.num)
            while True:
                self._release_markers(p)        # fsync: the primary alone is all there is
                batch = await self._next_batch(p)
                if batch:
                    p.acked_lsn = batch[-1].lsn
                    self._track_dirty(p, batch)
                self._notify()
        self.serving = True
        while True:
            try:
                await self._link(v, p)
            except (LinkError, *wire.CONN_ERRORS) as exc:
                log.warning("link to backup %s failed: %s", v.backup, exc)
                self._lost_backup(p)
                self.backup_synced = False
                await trio.sleep(self.cfg.ping_interval)

    def _track_dirty(self, p: Primary, batch) -> None:
        if p.dirty is not None:
            for rec in batch:
                p.dirty.update(c.block for c in rec.changes)

    def _lost_backup(self, p: Primary) -> None:
        """The link failed: remember what the backup may lack, for a later short sync
        (everything after the last batch it had made durable)."""
        if p.backup_synced:
            p.dirty = set()
            p.dirty_base = p.backup_durable
            p.backup_synced = False
        if p.dirty is not None and p.unacked:
            for _, blocks in p.unacked:
                p.dirty.update(blocks)
        p.unacked = None

    async def _pump(self, sub, send, scope: trio.CancelScope) -> None:
        """Commit records (commit order) into the primary's own stream, which also
        carries fsync markers in their place."""
        with scope:
            async with sub:         # closing it drops the subscription in the manager
                async for rec in sub:
                    try:
                        send.send_nowait(rec)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return      # demoted meanwhile

    def _release_markers(self, p: Primary) -> None:
        for m in p.markers:
            m.set()
        if p.markers:
            p.markers = []
            self._notify()

    def _take(self, p: Primary, item, batch: list) -> int:
        if isinstance(item, trio.Event):
            p.markers.append(item)
            return 0
        batch.append(item)
        p.committed_lsn = item.lsn
        return sum(len(c.data) for c in item.changes)

    async def _next_batch(self, p: Primary) -> list:
        """The next commit records (possibly none: only fsync markers)."""
        batch: list = []
        size = self._take(p, await p.commits.receive(), batch)
        while size < FORWARD_MAX:
            try:
                item = p.commits.receive_nowait()
            except trio.WouldBlock:
                break
            size += self._take(p, item, batch)
        return batch

    def _drain(self, p: Primary) -> list:
        out: list = []
        while True:
            try:
                self._take(p, p.commits.receive_nowait(), out)
            except trio.WouldBlock:
                return out

    async def _flush_backup(self, ch, v: View, p: Primary) -> None:
        """Answer waiting fsyncs: the backup forces everything it received."""
        if not p.markers:
            return
        markers, p.markers = p.markers, []
        await self._call(ch, wire.Flush(v.num, self.name, p.acked_lsn))
        for m in markers:
            m.set()
        self._notify()

    async def _link(self, v: View, p: Primary) -> None:
        with trio.fail_after(ACK_TIMEOUT):
            ch = await wire.connect(self.cfg.addr(self.name, v.backup), self.secret, self.name)
        try:
            with trio.fail_after(ACK_TIMEOUT):
                await ch.send(wire.SyncStart(v.num, self.name, p.incarnation))
                pos = await ch.receive()
            if isinstance(pos, wire.Refused):
                await self._refused(pos)
            if not isinstance(pos, wire.SyncPosition):
                raise LinkError(f"backup answered {pos.TAG} to sync-start")
            p.unacked = []
            if (pos.incarnation == p.incarnation and p.dirty is not None
                    and pos.lsn >= p.dirty_base):
                plan = sorted(p.dirty)
                self.stats["transfers_dirty"] += 1
                kind = "changed"
            else:
                plan = self._all_blocks()
                self.stats["transfers_full"] += 1
                kind = "allocated"
            p.dirty = None
            log.info("state transfer to %s: %d %s blocks", v.backup, len(plan), kind)
            t0 = time.monotonic()
            last_lsn = p.acked_lsn
            for i in range(0, len(plan), CHUNK):
                chunk = plan[i:i + CHUNK]
                last_lsn = await self._forward_ready(ch, v, p, last_lsn)
                while True:
                    await self.gate.close()
                    if not self.fs.mgr.in_doubt():
                        break
                    # a prepared (2PC) transaction's bytes are not committed state:
                    # wait until it is decided, refusing new prepares meanwhile
                    self.twopc.transfer_waiting = True
                    await self.gate.open()
                    last_lsn = await self._forward_ready(ch, v, p, last_lsn)
                    await trio.sleep(0.02)
                try:
                    recs = self._drain(p)
                    datas = await self._read_blocks(chunk)
                finally:
                    self.twopc.transfer_waiting = False
                    await self.gate.open()
                if recs:
                    last_lsn = await self._send_forward(ch, v, p, recs)
                await self._call(ch, wire.Snapshot(v.num, self.name, list(zip(chunk, datas)),
                                                   i + len(chunk), len(plan)))
                p.sync_progress = (i + len(chunk), len(plan))
                self.stats["blocks_transferred"] += len(chunk)
            last_lsn = await self._forward_ready(ch, v, p, last_lsn)
            await self._call(ch, wire.SyncDone(v.num, self.name, p.incarnation, last_lsn))
            p.backup_synced = True
            self.backup_synced = True
            # the transfer covered every commit consumed so far
            p.acked_lsn = max(p.acked_lsn, p.committed_lsn)
            p.sync_progress = (len(plan), len(plan))
            log.info("backup %s in sync after %.2f s; acknowledging view %d", v.backup,
                     time.monotonic() - t0, v.num)
            self.ping_view = v.num
            self._notify()
            while True:
                await self._flush_backup(ch, v, p)
                batch = await self._next_batch(p)
                if batch:
                    await self._send_forward(ch, v, p, batch)
        finally:
            await ch.aclose()

    async def _forward_ready(self, ch, v, p, last_lsn: int) -> int:
        recs = self._drain(p)
        if recs:
            last_lsn = await self._send_forward(ch, v, p, recs)
        await self._flush_backup(ch, v, p)
        return last_lsn

    async def _send_forward(self, ch, v: View, p: Primary, batch) -> int:
        lsn = batch[-1].lsn
        p.unacked.append((lsn, {c.block for r in batch for c in r.changes}))
        records = [[r.lsn, [[c.block, c.offset, c.data] for c in r.changes], r.kind,
                    r.payload if isinstance(r.payload, dict) else None, list(r.locks)]
                   for r in batch]
        t0 = time.perf_counter()
        await self._call(ch, wire.Forward(v.num, self.name, records))
        self.stats["forward_seconds"] += time.perf_counter() - t0
        p.acked_lsn = max(p.acked_lsn, lsn)
        self.stats["forwarded_batches"] += 1
        self._notify()
        return lsn

    async def _call(self, ch, msg) -> None:
        with trio.fail_after(ACK_TIMEOUT):
            await ch.send(msg)
            reply = await ch.receive()
        if isinstance(reply, wire.Refused):
            await self._refused(reply)
        if not isinstance(reply, wire.Ack):
            raise LinkError(f"backup answered {reply.TAG}")
        p = self.primary
        if p is not None and isinstance(reply.durable, int) and reply.durable > p.backup_durable:
            p.backup_durable = reply.durable
            if p.unacked:
                p.unacked = [(l, b) for l, b in p.unacked if l > reply.durable]

    async def _refused(self, r: wire.Refused) -> None:
        self.stats["refused_forwards"] += 1
        if r.view > self.view.num:
            # the backup knows a newer view: we are no longer primary
            log.warning("backup refused us (%s, it knows view %d)", r.reason, r.view)
            self.serving = False
            self._notify()
        raise LinkError(f"refused: {r.reason}")

    def _all_blocks(self) -> list[int]:
        sb = self.fs.sb
        mem = self.fs.bmap.mem
        log_lo, log_hi = sb.log_start, sb.log_start + sb.log_blocks
        out = [b for b in range(sb.nblocks) if mem[b] and not log_lo <= b < log_hi]
        out.extend(amo.replicated_tail(self.array.nblocks))
        return out

    async def _read_blocks(self, blocks: list[int]) -> list[bytes]:
        async def fn(txn):
            return [await txn.read(b) for b in blocks]
        return await self.fs.mgr.run(fn, name="snapshot")

    # ---------------------------------------------------------------- primary: operations
    def _check_serving(self) -> None:
        if self.role != "primary" or not self.serving:
            raise NotPrimaryError("not primary" if self.role != "primary" else "not ready")
        if trio.current_time() - self.last_vs_contact > self.lease:
            raise NotPrimaryError("cut off from the view server")

    async def _wait_acked(self, p: Primary, lsn: int) -> None:
        while p.acked_lsn < lsn:
            if self.primary is not p or not self.serving:
                raise NotPrimaryError("lost the primary role before the backup acknowledged")
            await self._changed.wait()
        if self.primary is not p:
            raise NotPrimaryError("lost the primary role")

    async def execute(self, req: wire.OpRequest):
        """Run one client operation; returns an OpReply value tuple (value, errno, msg).
        Raises NotPrimaryError."""
        self._check_serving()
        p = self.primary
        key = (req.client, req.lane)
        if req.method in TX_METHODS:
            # idempotent by transaction id; retransmissions wait for the first
            return await self._once((req.client, req.lane, req.seq),
                                    lambda: self._execute_tx(req))
        if req.method in UPDATES:
            prev = p.table.lookup(key)
            if prev is not None and req.seq <= prev[0]:
                self.stats["duplicates"] += 1
                if req.seq < prev[0]:
                    return None, 0, "stale request"
                await self._wait_acked(p, p.committed_lsn)   # it may not be acked yet
                return wire.unpack_value(prev[1]), 0, ""
            return await self._once((req.client, req.lane, req.seq),
                                    lambda: self._execute_update(p, key, req))
        if req.method == "fsync":
            await self.fs.fsync()
            await self._wait_acked(p, p.committed_lsn)
            marker = trio.Event()
            p.stream.send_nowait(marker)
            while not marker.is_set():
                if self.primary is not p or not self.serving:
                    raise NotPrimaryError("lost the primary role during fsync")
                await self._changed.wait()
            return None, 0, ""
        if req.method not in READS:
            raise wire.ProtocolError(f"unknown method {req.method!r}")
        try:
            return await getattr(self.fs, req.method)(*req.args, **req.kwargs), 0, ""
        except ForeignInode as exc:     # the client asks the inode's own group
            return exc.ino, exc.errno, str(exc)
        except FsError as exc:
            return None, exc.errno, str(exc)

    async def _once(self, ikey, run):
        """Run `run()` once per (client, lane, seq); a retransmission that arrives while
        it runs waits for its result."""
        running = self._inflight.get(ikey)
        if running is not None:     # a retransmission while the first is running
            self.stats["duplicates"] += 1
            await running.done.wait()
            if isinstance(running.result, Exception):
                raise running.result
            return running.result
        running = self._inflight[ikey] = _Inflight()
        try:
            running.result = await run()
            return running.result
        except Exception as exc:
            running.result = exc
            raise
        except BaseException:
            running.result = NotPrimaryError("interrupted")
            raise
        finally:
            running.done.set()
            del self._inflight[ikey]

    async def _execute_tx(self, req: wire.OpRequest):
        """2PC messages between group primaries (replication/twopc.py)."""
        a = req.args
        try:
            if req.method == "tx_prepare":
                gtid, coord, steps = a
                if not (isinstance(gtid, str) and isinstance(coord, int) and isinstance(steps, list)
                        and all(isinstance(st, list) and st and isinstance(st[0], str)
                                for st in steps)):
                    raise wire.ProtocolError("malformed tx_prepare")
                return await self.twopc.prepare(gtid, coord, steps), 0, ""
            if req.method == "tx_decide":
                gtid, commit = a
                return await self.twopc.decide(str(gtid), bool(commit)), 0, ""
            (gtid,) = a
            return self.twopc.query(str(gtid)), 0, ""
        except FsError as exc:
            return None, exc.errno, str(exc)

    async def _execute_update(self, p: Primary, key, req: wire.OpRequest):
        if req.method == "mkdir" and len(req.args) >= 2:
            target = self.cfg.place_dir(req.args[0], req.args[1])
            if target != self.group:
                return await self.twopc.execute(p, key, req, group=target)
        packed = {}

        async def before_commit(txn, result):
            packed["reply"] = await p.table.record(txn, key, req.seq, result)

        token = Request(payload=lambda result: [req.client, req.lane, req.seq],
                        before_commit=before_commit)
        t0 = time.perf_counter()
        await self.gate.enter()
        try:
            self._check_serving()
            reset = current_request.set(token)
            try:
                result = await getattr(self.fs, req.method)(*req.args, **req.kwargs)
            except ForeignInode as exc:
                if req.method not in DISTRIBUTED:
                    return exc.ino, exc.errno, str(exc)
                result = exc
            except FsError as exc:
                return None, exc.errno, str(exc)
            finally:
                current_request.reset(reset)
        finally:
            await self.gate.leave()
        if isinstance(result, ForeignInode):        # it spans groups: two-phase commit
            return await self.twopc.execute(p, key, req)
        self.stats["ops"] += 1
        t1 = time.perf_counter()
        self.stats["execute_seconds"] += t1 - t0
        if token.commit is not None and token.commit.lsn is not None:
            p.committed_lsn = max(p.committed_lsn, token.commit.lsn)
            p.table.remember(key, req.seq, packed["reply"])
            await self._wait_acked(p, token.commit.lsn)
            self.confirm(token.commit.txn)
        self.stats["ack_wait_seconds"] += time.perf_counter() - t1
        return result, 0, ""

    # ---------------------------------------------------------------- backup
    def _backup_check(self, view: int, primary: str) -> wire.Refused | None:
        if self.role != "backup" or view != self.view.num or primary != self.view.primary:
            self.stats["refused_forwards"] += 1
            return wire.Refused(self.view.num, f"{self.name} is {self.role} in view "
                                f"{self.view.num} (primary {self.view.primary or '-'}); "
                                f"{primary} sent view {view}")
        return None

    async def _read_position(self) -> tuple[str, int]:
        blk = amo.position_block(self.array.nblocks)

        async def fn(txn):
            return await txn.read(blk)
        return amo.unpack_position(await self.fs.mgr.run(fn, name="position"))

    async def _apply(self, changes: list, position: tuple[str, int] | None) -> None:
        """Apply the primary's changes, as few local transactions as the log allows
        (the position, written with the last, says they are all here)."""
        if position is not None:
            changes = changes + [(amo.position_block(self.array.nblocks), 0,
                                  amo.pack_position(*position))]
        limit = max(4096, self.fs.mgr.max_txn_bytes // 2)   # redo + record overhead
        async with self.apply_lock:
            chunk, size = [], 0
            for c in changes:
                if chunk and size + len(c[2]) > limit:
                    await self.fs.mgr.apply(chunk, durable=False, undo=False)
                    chunk, size = [], 0
                chunk.append(c)
                size += len(c[2]) + 64
            if chunk:
                await self.fs.mgr.apply(chunk, durable=False, undo=False)
        if position is not None:
            self._unforced_position = position
        self._apply_dirty.set()

    async def _force_applied(self) -> None:
        """Make everything applied durable; only then is its position ours to report
        (`Ack.durable`, `SyncPosition`). A batch applied without undo that a crash cut
        in half lies beyond that position, so the primary sends it again."""
        pos = self._unforced_position
        await self.fs.mgr.force()
        if pos is not None and self._unforced_position is pos:
            self._unforced_position = None
        if pos is not None:
            self.position = pos

    async def _backup_flusher(self) -> None:
        """Applies commit lazily (one force per batch would make every operation wait
        for the backup's disk); this forces them within FLUSH_BEHIND."""
        while True:
            await self._apply_dirty.wait()
            await trio.sleep(FLUSH_BEHIND)
            self._apply_dirty = trio.Event()
            async with self.apply_lock:
                if self.role != "primary":
                    await self._force_applied()

    # The backup acknowledges a forward once it holds it (in memory, in order) and
    # applies it in the background, several batches per local transaction (one force):
    # an update acknowledged to a client is durable on the primary and held by the
    # backup, so it survives the crash of either; `Flush` (fsync) waits until the backup
    # has forced everything it received. A backup that crashes loses only what the
    # primary still remembers as not durable there (`Ack.durable`).

    def _enqueue(self, item: tuple, nbytes: int) -> None:
        self._applyq.append((item, nbytes))
        self._queued_bytes += nbytes
        self._received += 1
        self._applyq_event.set()

    async def _wait_applied(self) -> None:
        target = self._received
        while self._applied < target:
            await self._changed.wait()

    async def _applier(self) -> None:
        while True:
            if not self._applyq:
                self._applyq_event = trio.Event()
                await self._applyq_event.wait()
                continue
            with trio.CancelScope(shield=True):     # a batch is applied whole
                await self._apply_next()

    async def _drain_applyq(self) -> None:
        """At a clean stop: apply what we acknowledged but did not apply yet."""
        while self._applyq and self.role != "primary":
            await self._apply_next()

    async def _apply_next(self) -> None:
        """Apply the next group of queued items (a 2PC event is a group of its own)."""
        group, size = [], 0
        while self._applyq and (not group or size < APPLY_MAX):
            if group and self._applyq[0][0][0] == "2pc":
                break
            item, nbytes = self._applyq.pop(0)
            group.append(item)
            size += nbytes
            if item[0] == "2pc":
                break
        changes: list = []
        pos = None
        synced, inc = self._q_synced, self._q_inc
        for item in group:
            kind = item[0]
            if kind == "unsync":
                synced, inc, pos = False, item[1], ("", 0)
            elif kind == "fwd":
                changes.extend(item[1])
                if synced:
                    pos = (inc, item[2])
            elif kind == "snap":
                changes.extend(item[1])
            elif kind == "synced":
                synced, inc, pos = True, item[1], (item[1], item[2])
            elif kind == "2pc":
                await self._apply_2pc(*item[1:6])
                if synced:
                    pos = (inc, item[6])
        await self._apply(changes, pos)
        self._q_synced, self._q_inc = synced, inc
        self.backup_synced = synced
        self._queued_bytes -= size
        self._applied += len(group)
        self.stats["applied_batches"] += 1
        self._notify()

    async def _apply_2pc(self, kind: str, gtid: str, changes: list, payload, locks: list) -> None:
        """The backup's copy of a participant's prepared transaction: PREPARE makes a
        local prepared transaction (same bytes, same locks: it survives our restart
        and our promotion in doubt); COMMIT/ABORT end it. Without the local copy (we
        were away when it prepared) the after-/before-images are applied as they come."""
        mgr = self.fs.mgr
        async with self.apply_lock:
            if kind == "prepare":
                txn = mgr.begin("replica-prepare")
                try:
                    for b, o, d in changes:
                        await txn.write(b, o, d)
                    for k in locks:
                        txn.lock_nowait(k, "X")
                    await txn.prepare(payload)
                except BaseException:
                    await txn.abort()
                    raise
                return
            txn = next((t for t in mgr.in_doubt()
                        if isinstance(t.payload, dict) and t.payload.get("gtid") == gtid), None)
            if txn is not None:
                if kind == "commit":
                    await txn.commit()
                else:
                    await txn.abort()
            elif changes:
                await mgr.apply(changes)

    async def _abort_local_in_doubt(self) -> None:
        """A backup (re)joining: its own prepared transactions are not the primary's
        truth any more (the primary decided them or still holds them): undo them; the
        state transfer brings whatever the primary has."""
        async with self.apply_lock:
            for txn in self.fs.mgr.in_doubt():
                await txn.abort()

    def _durable_for(self, incarnation: str) -> int:
        return self.position[1] if self.position[0] == incarnation and self.position[0] else 0

    async def _on_sync_start(self, ch: wire.Channel, msg: wire.SyncStart) -> None:
        if msg.view > self.view.num:
            await self._refresh_view()
        if await self._refuse(ch, msg):
            return
        await self._wait_applied()          # report the position that is on disk
        async with self.apply_lock:
            await self._force_applied()
        await self._abort_local_in_doubt()
        await ch.send(wire.SyncPosition(*self.position))
        self.sync_incarnation = msg.incarnation
        self._enqueue(("unsync", msg.incarnation), 0)   # no position until SyncDone
        self.sync_progress = (0, 0)

    async def _refuse(self, ch: wire.Channel, msg) -> bool:
        refused = self._backup_check(msg.view, msg.primary)
        if refused:
            await ch.send(refused)
            return True
        while self._queued_bytes > QUEUE_MAX:   # flow control: stop reading the link
            await self._changed.wait()
        return False

    async def _on_forward(self, ch: wire.Channel, msg: wire.Forward) -> None:
        if await self._refuse(ch, msg):
            return
        changes: list = []
        lsn = msg.records[-1][0]
        for rlsn, cs, kind, payload, locks in msg.records:
            gtid = payload.get("gtid") if isinstance(payload, dict) else None
            if kind == "commit" and gtid is None:
                changes.extend((b, o, d) for b, o, d in cs)
                continue
            # a 2PC event (replication/twopc.py): applied in its place in the order
            if changes:
                self._enqueue(("fwd", changes, rlsn), sum(len(c[2]) for c in changes))
                changes = []
            item = ("2pc", kind, str(gtid), [(b, o, d) for b, o, d in cs], payload,
                    [tuplify(k) for k in locks], rlsn)
            self._enqueue(item, sum(len(c[2]) for c in cs))
        if changes:
            self._enqueue(("fwd", changes, lsn), sum(len(c[2]) for c in changes))
        self.applied_lsn = lsn
        await ch.send(wire.Ack(lsn, self._durable_for(self.sync_incarnation)))

    async def _on_snapshot(self, ch: wire.Channel, msg: wire.Snapshot) -> None:
        if await self._refuse(ch, msg):
            return
        self._enqueue(("snap", [(b, 0, d) for b, d in msg.blocks]), 4096 * len(msg.blocks))
        self.sync_progress = (msg.sent, msg.total)
        if msg.sent == msg.total or msg.sent % (CHUNK * 16) == 0:
            log.info("state transfer: %d of %d blocks", msg.sent, msg.total)
        await ch.send(wire.Ack(0, self._durable_for(self.sync_incarnation)))

    async def _on_sync_done(self, ch: wire.Channel, msg: wire.SyncDone) -> None:
        if await self._refuse(ch, msg):
            return
        self._enqueue(("synced", msg.incarnation, msg.lsn), 0)
        log.info("in sync with primary %s (incarnation %s, lsn %d)", msg.primary,
                 msg.incarnation, msg.lsn)
        await ch.send(wire.Ack(msg.lsn, self._durable_for(self.sync_incarnation)))

    async def _on_flush(self, ch: wire.Channel, msg: wire.Flush) -> None:
        if await self._refuse(ch, msg):
            return
        await self._wait_applied()
        async with self.apply_lock:
            await self._force_applied()
        await ch.send(wire.Ack(msg.lsn, self._durable_for(self.sync_incarnation)))

    async def _refresh_view(self) -> None:
        try:
            with trio.fail_after(self.cfg.ping_interval * 3):
                ch = await wire.connect(self.cfg.addr(self.name, VIEWSERVER), self.secret, self.name)
                try:
                    await ch.send(wire.GetView(self.group))
                    r = await ch.receive()
                finally:
                    await ch.aclose()
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
                wire.Flush: self._on_flush}
        async with trio.open_nursery() as nursery:
            while True:
                msg = await ch.receive()
                handler = link.get(type(msg))
                if handler is not None:
                    _check_link(msg)
                    await handler(ch, msg)
                elif isinstance(msg, wire.OpRequest):
                    _check_op(msg)
                    nursery.start_soon(self._serve_op, ch, msg)
                elif isinstance(msg, wire.StatusRequest):
                    await ch.send(wire.StatusReply(self.status()))
                elif isinstance(msg, wire.CrashAt) and isinstance(msg.spec, str):
                    from replfs import crash
                    crash.arm(msg.spec)
                    log.warning("crash points armed: %s", msg.spec)
                    await ch.send(wire.StatusReply({"armed": msg.spec}))
                else:
                    raise wire.ProtocolError(f"a server does not take {msg.TAG}")

    async def _serve_op(self, ch: wire.Channel, msg: wire.OpRequest) -> None:
        try:
            value, err, text = await self.execute(msg)
            reply = wire.OpReply(msg.rid, value, err, text)
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
                   **self.twopc.status())
        if p is not None:
            out.update(incarnation=p.incarnation, committed_lsn=p.committed_lsn,
                       acked_lsn=p.acked_lsn, lag_bytes=max(0, p.committed_lsn - p.acked_lsn),
                       sync_progress=list(p.sync_progress))
        else:
            out.update(position=list(self.position),
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
                repaired=sum(int(d.get("cksum_errors", 0) or 0) for d in disks))


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
            and all(isinstance(c, list) and len(c) == 3 and isinstance(c[0], int)
                    and isinstance(c[1], int) and isinstance(c[2], bytes) for c in r[1])
            and r[2] in ("commit", "prepare", "abort") and (r[3] is None or isinstance(r[3], dict))
            and isinstance(r[4], list)
            for r in msg.records)
    elif isinstance(msg, wire.Snapshot):
        ok = isinstance(msg.blocks, list) and all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[0], int)
            and isinstance(b[1], bytes) and len(b[1]) == 4096 for b in msg.blocks)
    elif isinstance(msg, wire.Flush):
        ok = isinstance(msg.lsn, int)
    else:
        ok = isinstance(msg.incarnation, str)
    if not ok:
        raise wire.ProtocolError(f"malformed {msg.TAG}")
