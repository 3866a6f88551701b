"""The primary's side of a replica server (`PrimaryRole`, mixed into `ReplicaServer`).

Operations: the primary executes each client operation as a transaction with
`current_request` set (fs/values.py), records the reply in the at-most-once table inside
that same transaction (replication/amo.py), and answers only once its backup has
acknowledged the transaction (or the view has no backup). A retransmission of a request
that is still running waits for its result (`_once`).

Forwarding: a single task reads the transaction manager's commit stream
(`mgr.subscribe_into`, commit order, with fsync markers in their place) and ships
batches of commit records (their byte-range after-images) to the backup. The stream carries each commit as soon as it is appended,
so the primary's own log write and the round trip to the backup overlap. `fsync`
additionally sends `Flush` and returns once the backup has forced everything it received.

State transfer to a new backup runs inside that same ordered stream: the primary
computes a plan (every allocated logical block, or only the blocks changed since the
backup was last in sync), and for each chunk briefly closes the *gate* that update
operations pass (so no transaction is live and the cache holds committed state only),
drains the commit stream, reads the chunk, reopens the gate and sends the chunk after the
forwards it already includes. Updates keep flowing between chunks. Only after
`SyncDone` does the primary acknowledge the view, so a backup that does not yet hold
the state can never be promoted.

A backup that comes back after a short absence: the backup reports its durable position
(the primary's incarnation id and the LSN of the last batch it forced); if the primary's
persistent dirty map (replication/dirtymap.py: every block changed since a base position,
marked before the change can reach a disk) covers that position, only the map's blocks
are sent -- after a restart of the primary too. Otherwise every allocated block.

The lease: a primary serves (reads included) only while it heard from the view server
within `lease` (dead_pings x ping_interval) -- after that the view server may have made
its backup primary. While the view server is silent (dead, restarting), the backup
renews the lease instead: every message it takes from its primary counts (`Renew` when
idle), it accepts them only as the backup of the current view, and once it has renewed
a lease it does not serve as primary itself until that lease ran out. A primary whose
view has no backup needs no lease: nobody else can become primary of its group.

The attributes used here belong to `ReplicaServer` (replication/server.py), which sets
them all up in its `__init__`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from replfs.crash import crash_point
from replfs.fs.core import Request, current_request
from replfs.fs.errors import ForeignInode, FsError
from replfs.fs.layout import ino_group
from replfs.replication import amo, wire
from replfs.replication.twopc import DISTRIBUTED, TX_METHODS
from replfs.replication.viewserver import View

log = logging.getLogger("replfs.server")

UPDATES = frozenset({"setattr", "mknod", "create", "mkdir", "symlink", "link", "unlink",
                     "rmdir", "forget", "rename", "write", "setxattr", "removexattr",
                     "fallocate"})
READS = frozenset({"lookup", "getattr", "readlink", "read", "readdir", "statfs",
                   "getxattr", "listxattr", "entry", "dir_info", "release_number",
                   "release_numbers"})
CHUNK = 64                  # blocks per state-transfer message
ACK_TIMEOUT = 5.0
FORWARD_MAX = 2**20     # bytes of after-images per forward batch
REBASE_INTERVAL = 0.5   # seconds between moves of the dirty map's base (in sync)


class NotPrimaryError(Exception):
    pass

class LinkError(Exception):
    pass


class Gate:
    """Update operations pass the gate concurrently (`enter`/`leave`); a state-transfer
    chunk closes it (`close`) once every operation inside has left. Waiting closers go
    first. Passing costs no scheduling round: one event wakes every waiter, who looks
    again (trio runs one task at a time, so a check and its update are one step)."""

    def __init__(self):
        self.inside = 0
        self.closing = 0
        self.shut = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def enter(self) -> None:
        while self.shut or self.closing:
            await self._changed.wait()
        self.inside += 1

    async def leave(self) -> None:
        self.inside -= 1
        if self.closing and not self.inside:
            self._notify()

    async def close(self) -> None:
        self.closing += 1
        try:
            while self.inside or self.shut:
                await self._changed.wait()
        finally:
            self.closing -= 1
            self._notify()      # enterers held back by this closer look again
        self.shut = True

    async def open(self) -> None:
        self.shut = False
        self._notify()


@dataclass
class Primary:
    """What a server holds while it is primary (one incarnation)."""
    incarnation: str
    table: amo.AmoTable
    commits: trio.MemoryReceiveChannel
    committed_lsn: int = 0
    acked_lsn: int = 0
    backup_synced: bool = False
    backup_durable: int = 0
    link_durable: int = 0           # what the backup of the current link reported forced
    lease_from: float = -1e9        # sent time of the last request the backup acknowledged
    markers: list = field(default_factory=list)     # fsyncs waiting for the backup's flush
    stream: trio.MemorySendChannel | None = None
    sync_progress: tuple[int, int] = (0, 0)
    sync_kind: str = ""             # the running (or last) transfer: incremental / full



class Inflight:
    """An update being executed; retransmissions wait for its result."""

    def __init__(self):
        self.done = trio.Event()
        self.result = None



class PrimaryRole:
    """What a server does as primary: replicate to its backup, execute operations."""

    # ---------------------------------------------------------------- primary: replication
    async def _replicate(self, v: View) -> None:
        p = self.primary
        # as a backup this server renewed the old primary's lease: it may still serve
        # until that ran out
        wait = max(self.lease_grants.values(), default=-1e9) + self.lease - trio.current_time()
        if wait > 0:
            log.info("waiting %.2f s for the old primary's lease to run out", wait)
            await trio.sleep(wait)
        if p.backup_synced:
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

    def _mark_dirty(self, rec) -> None:
        """`TxnManager.on_append`: the blocks of a commit (or 2PC event) go into the dirty
        map before the record can reach this server's disk or the backup."""
        self.dirtymap.mark({c.block for c in rec.changes}, rec.lsn)

    def _lost_backup(self, p: Primary) -> None:
        """The link failed: the dirty map holds what the backup may lack (everything
        after its base, a position the backup had forced)."""
        p.backup_synced = False

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
        try:
            first = p.commits.receive_nowait()      # no scheduling round when one waits
        except trio.WouldBlock:
            first = await p.commits.receive()
        size = self._take(p, first, batch)
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
            p.link_durable = 0
            plan = self._plan(p, (pos.incarnation, pos.lsn), pos.own_base, pos.own_marks)
            log.info("%s state transfer to %s: %d blocks (of %d allocated)", p.sync_kind,
                     v.backup, len(plan), self.stats["last_transfer"]["allocated"])
            t0 = time.monotonic()
            p.sync_progress = (0, len(plan))
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
                                                   i + len(chunk), len(plan), p.sync_kind))
                p.sync_progress = (i + len(chunk), len(plan))
                self.stats["blocks_transferred"] += len(chunk)
                crash_point("sync.chunk.sent")
            last_lsn = await self._forward_ready(ch, v, p, last_lsn)
            await self._call(ch, wire.SyncDone(v.num, self.name, p.incarnation, last_lsn))
            p.backup_synced = True
            self.backup_synced = True
            # the transfer covered every commit consumed so far
            p.acked_lsn = max(p.acked_lsn, p.committed_lsn)
            p.sync_progress = (len(plan), len(plan))
            self.stats["last_transfer"].update(seconds=round(time.monotonic() - t0, 3))
            log.info("backup %s in sync after %.2f s; acknowledging view %d", v.backup,
                     time.monotonic() - t0, v.num)
            self.ping_view = v.num
            self._notify()
            done_lsn, rebased = last_lsn, 0.0
            while True:
                now = trio.current_time()
                if p.link_durable >= done_lsn and now - rebased >= REBASE_INTERVAL:
                    # the backup forced all of the transfer and what followed up to here
                    self.dirtymap.rebase(p.incarnation, p.link_durable)
                    rebased = now
                await self._flush_backup(ch, v, p)
                with trio.move_on_after(self.lease / 3) as idle:
                    batch = await self._next_batch(p)
                if idle.cancelled_caught:
                    await self._call(ch, wire.Renew(v.num, self.name))
                elif batch:
                    await self._send_forward(ch, v, p, batch)
        finally:
            # the backup voids what this link granted once it sees the link closed
            # (server.py `lease_grants`): no serving on it from now on
            p.lease_from = -1e9
            await ch.aclose()

    async def _forward_ready(self, ch, v, p, last_lsn: int) -> int:
        recs = self._drain(p)
        if recs:
            last_lsn = await self._send_forward(ch, v, p, recs)
        await self._flush_backup(ch, v, p)
        return last_lsn

    async def _send_forward(self, ch, v: View, p: Primary, batch) -> int:
        lsn = batch[-1].lsn
        records = [[r.lsn, [[c.block, c.offset, c.data, 1] if c.fresh else
                            [c.block, c.offset, c.data] for c in r.changes], r.kind,
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
        sent = trio.current_time()
        with trio.fail_after(ACK_TIMEOUT):
            await ch.send(msg)
            reply = await ch.receive()
        if isinstance(reply, wire.Refused):
            await self._refused(reply)
        if not isinstance(reply, wire.Ack):
            raise LinkError(f"backup answered {reply.TAG}")
        p = self.primary
        if p is not None:
            p.lease_from = max(p.lease_from, sent)
        if p is not None and isinstance(reply.durable, int):
            p.backup_durable = max(p.backup_durable, reply.durable)
            p.link_durable = max(p.link_durable, reply.durable)

    async def _refused(self, r: wire.Refused) -> None:
        self.stats["refused_forwards"] += 1
        if r.view > self.view.num:
            # the backup knows a newer view: we are no longer primary
            log.warning("backup refused us (%s, it knows view %d)", r.reason, r.view)
            self.serving = False
            self._notify()
        raise LinkError(f"refused: {r.reason}")

    def _plan(self, p: Primary, position: tuple[str, int], own_base=None,
              own_marks=()) -> list[int]:
        """The blocks to send a backup whose forced position is `position`: the dirty
        map's, if it covers that position; the union of the dirty map and the backup's
        own (`own_base`, `own_marks`: it was primary since) if the two merge -- our old
        primary back after a failover (dirtymap.py); else every allocated block."""
        if self.dirtymap.covers(position):
            plan = [b for b in self.dirtymap.blocks() if self._replicated(b)]
            p.sync_kind = "incremental"
            self.stats["transfers_dirty"] += 1
        elif self.dirtymap.merges(own_base) and isinstance(own_marks, list) \
                and all(isinstance(b, int) for b in own_marks):
            union = set(self.dirtymap.blocks()).union(own_marks)
            plan = sorted(b for b in union if 0 <= b < self.array.nblocks and self._replicated(b))
            p.sync_kind = "incremental"
            self.stats["transfers_dirty"] += 1
            self.stats["transfers_merged"] += 1
        else:
            plan = self._all_blocks()
            p.sync_kind = "full"
            self.stats["transfers_full"] += 1
        sb, mem = self.fs.sb, self.fs.bmap.mem
        allocated = (len(mem) - mem.count(0) - sb.log_blocks
                     + len(amo.replicated_tail(self.array.nblocks)))
        self.stats["last_transfer"] = dict(kind=p.sync_kind, planned=len(plan),
                                           allocated=allocated, seconds=None)
        return plan

    def _replicated(self, b: int) -> bool:
        """Is block `b` part of the replicated state (allocated, not the log)?"""
        sb = self.fs.sb
        if b >= sb.nblocks:
            return b in amo.replicated_tail(self.array.nblocks)
        return bool(self.fs.bmap.mem[b]) and not sb.log_start <= b < sb.log_start + sb.log_blocks

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
        now = trio.current_time()
        if now - self.last_vs_contact > self.lease and self.view.backup:
            # the view server may have given the group to the backup: serve on only while
            # the backup itself renews the lease (it answers only as our backup, and then
            # does not serve as primary for a lease). With no backup in the view nobody
            # else can become primary of the group: no lease is needed.
            p = self.primary
            if p is None or not p.backup_synced or now - p.lease_from > self.lease:
                raise NotPrimaryError("cut off from the view server and the backup")

    async def _wait_acked(self, p: Primary, lsn: int) -> None:
        while p.acked_lsn < lsn:
            if self.primary is not p or not self.serving:
                raise NotPrimaryError("lost the primary role before the backup acknowledged")
            await self._changed.wait()
        if self.primary is not p:
            raise NotPrimaryError("lost the primary role")

    async def _written(self, p: Primary, lsn: int) -> None:
        """Wait until the commit at `lsn` is written on this primary (`mgr.write()`: in
        its image files; forced already when every commit is) and held -- written, or
        forced -- by the backup (`_wait_acked`): then it survives `kill -9` of both."""
        if not self.forced:
            await self.fs.mgr.write()
        await self._wait_acked(p, lsn)

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
                await self._written(p, p.committed_lsn)     # it may not be acked yet
                return wire.unpack_value(prev[1]), 0, ""
            return await self._once((req.client, req.lane, req.seq),
                                    lambda: self._execute_update(p, key, req))
        if req.method == "fsync":
            # the marker goes into the stream first, after every commit published so far,
            # so that the backup forces (`Flush`) while this primary forces its own log
            marker = trio.Event()
            p.stream.send_nowait(marker)
            # a scheduling round first: the forwarding task sends the backup its Flush
            # before this task spends its time starting the local force
            await trio.lowlevel.checkpoint()
            await self.fs.fsync()
            await self._wait_acked(p, p.committed_lsn)
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
        running = self._inflight[ikey] = Inflight()
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
        if (req.method == "rename" and len(req.args) >= 3 and type(req.args[2]) is int
                and ino_group(req.args[2]) != self.group):
            # between directories of two groups: two-phase commit at once (a local
            # attempt would only find the other directory foreign, and abort)
            return await self.twopc.execute(p, key, req)
        packed = {}

        async def before_commit(txn, result):
            packed["reply"] = await p.table.record(txn, key, req.seq, result)

        token = Request(payload=lambda result: [req.client, req.lane, req.seq],
                        before_commit=before_commit, durable=self.forced)
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
            await self._written(p, token.commit.lsn)
            self.confirm(token.commit.txn)
        self.stats["ack_wait_seconds"] += time.perf_counter() - t1
        return result, 0, ""
