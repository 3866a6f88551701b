"""The backup's side of a replica server (`BackupRole`, mixed into `ReplicaServer`).

A backup rejects client operations, and forwards from anyone but the primary of the view
it knows: a backup that learnt of a newer view refuses the old primary's forwards.

It acknowledges a forward once it has applied it and *written* it (its log records are
in its image files: they survive `kill -9` of this server, as they survive on the
primary), several queued batches per local transaction, without undo records; it forces
them within FLUSH_BEHIND (or before every acknowledgement, when the cluster forces every
operation: `durability = "forced"`). So an acknowledged update survives the crash of
either replica or of both. `Flush` (fsync) waits until the backup has forced everything
it received. The position it reports as durable (`Ack.durable`, `SyncPosition`: the
primary's incarnation and the LSN of the last batch) is the forced one, stored in its
own position block in the same transaction as the batch; a batch cut in half by a crash
lies beyond it, so the primary sends it again.

A participant's 2PC PREPARE reaches the backup in the same stream and becomes a prepared
transaction of its own (same bytes, same locks), so a promotion or a restart finds it in
doubt with its locks held.

The attributes used here belong to `ReplicaServer` (replication/server.py), which sets
them all up in its `__init__`.
"""

from __future__ import annotations

import logging

import trio

from replfs.replication import amo, needscopy, wire
from replfs.txn.records import tuplify

log = logging.getLogger("replfs.server")

APPLY_MAX = 2**20       # bytes of after-images per backup transaction
QUEUE_MAX = 16 * 2**20  # bytes a backup holds unapplied before it stops reading
MARKS_MAX = 500_000     # blocks of its own dirty map a returning backup sends (a frame)
FLUSH_BEHIND = 1.0      # seconds an applied (written) batch may stay unforced: what a
                        # power loss of both machines can take (ext4's commit interval)


class BackupRole:
    """What a server does as backup: take the primary's stream, apply it, force it."""

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
        """Apply the primary's changes, as few REDO records as the log allows (each
        whole or absent after a crash; the position, written with the last, says they
        are all here)."""
        if position is not None:
            changes = changes + [(amo.position_block(self.array.nblocks), 0,
                                  amo.pack_position(*position))]
        limit = max(4096, self.fs.mgr.max_txn_bytes // 2)   # redo + record overhead
        async with self.apply_lock:
            chunk, size = [], 0
            for c in changes:
                if chunk and size + len(c[2]) > limit:
                    await self.fs.mgr.apply_redo(chunk)
                    chunk, size = [], 0
                chunk.append(c)
                size += len(c[2]) + 64
            if chunk:
                await self.fs.mgr.apply_redo(chunk)
        if position is not None:
            self._unforced_position = position
            self._position_seq += 1
        self._apply_dirty.set()

    async def _force_applied(self) -> None:
        """Make everything applied durable; only then is its position ours to report
        (`Ack.durable`, `SyncPosition`). A batch applied without undo that a crash cut
        in half lies beyond that position, so the primary sends it again.

        Needs no `apply_lock`: the position taken is that of batches applied whole
        before the force began, and the force covers every record appended before it
        began; batches applied meanwhile keep their own position for the next force.
        (Holding the lock would stop the applier, and so every acknowledgement, for as
        long as the device takes to flush.)"""
        pos, seq = self._unforced_position, self._position_seq
        await self.fs.mgr.force()
        if pos is not None and self._unforced_position is pos:
            self._unforced_position = None
        if pos is not None and seq > self._forced_seq:     # (concurrent forces: newest wins)
            self.position, self._forced_seq = pos, seq
            if self.needs_copy and pos[0]:
                # a position again: the end of a full transfer, forced (a full one makes
                # the position meaningless at its first block)
                needscopy.clear(self.array.dir)
                self.needs_copy = False
                log.info("%s holds a full copy of its group's state again", self.name)

    async def _backup_flusher(self) -> None:
        """Batches are applied and written, not forced (one force per batch would make
        every operation wait for the backup's disk); this forces them within FLUSH_BEHIND."""
        while True:
            await self._apply_dirty.wait()
            await trio.sleep(FLUSH_BEHIND)
            self._apply_dirty = trio.Event()
            if self.role != "primary":
                await self._force_applied()

    # Forwards queue here and are applied in order, several batches per REDO record: by
    # the task that received them when nobody else is applying, else by the applier
    # task (a state transfer's chunks); a forward is acknowledged once it is applied and
    # written (`_hold`). A backup that crashes loses nothing it acknowledged; what the primary
    # still remembers as not forced there (`Ack.durable`) it sends again on return.

    def _enqueue(self, item: tuple, nbytes: int, wake: bool = True) -> None:
        self._applyq.append((item, nbytes))
        self._queued_bytes += nbytes
        self._received += 1
        if wake:
            self._applyq_event.set()

    async def _wait_applied(self) -> None:
        target = self._received
        while self._applied < target:
            await self._changed.wait()

    async def _applier(self) -> None:
        """Applies what arrives without waiting for it (a state transfer's chunks);
        a forward is applied by the task that received it, when nobody else is
        applying (`_on_forward`), which saves two task switches per operation."""
        while True:
            if not self._applyq or self._applying:
                self._applyq_event = trio.Event()
                await self._applyq_event.wait()
                continue
            await self._apply_queued()

    async def _apply_queued(self) -> None:
        """Apply everything queued, in order (one applier at a time)."""
        self._applying = True
        try:
            with trio.CancelScope(shield=True):     # a batch is applied whole
                while self._applyq:
                    await self._apply_next()
        finally:
            self._applying = False
            if self._applyq:
                self._applyq_event.set()

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
                # a transfer begins; a full one makes the position meaningless at once,
                # an incremental one leaves it (every block it changes is in the
                # primary's dirty map until it is done)
                synced, inc = False, item[1]
                if item[2]:
                    pos = ("", 0)
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
        await self._force_applied()
        await self._abort_local_in_doubt()
        # a map of our own (we were primary since): the new primary may send the union
        # of the two maps (dirtymap.py), e.g. to its old primary back after a failover
        base, marks = self.dirtymap.base, self.dirtymap.blocks()
        if base is None or len(marks) > MARKS_MAX:
            base, marks = None, []
        # from here on this server follows another primary: its own dirty map (from a
        # time it was primary) no longer describes its state
        self.dirtymap.invalidate()
        await ch.send(wire.SyncPosition(*self.position, list(base) if base else None, marks))
        self.sync_incarnation = msg.incarnation
        self._enqueue(("unsync", msg.incarnation, False), 0)    # no new position until SyncDone
        self.sync_progress = (0, 0)
        self.sync_kind = ""

    async def _refuse(self, ch: wire.Channel, msg) -> bool:
        refused = self._backup_check(msg.view, msg.primary)
        if refused:
            await ch.send(refused)
            return True
        # every message the backup takes from its primary renews the primary's lease
        # (sent before it arrived): no serving as a primary ourselves until it ran out
        now = trio.current_time()
        self.lease_grants[ch] = now
        if len(self.lease_grants) > 8:      # connections that ended otherwise, run out
            self.lease_grants = {k: t for k, t in self.lease_grants.items()
                                 if now - t < self.lease}
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
                changes.extend(cs)      # [block, offset, data(, 1 for a fresh block)]
                continue
            # a 2PC event (replication/twopc.py): applied in its place in the order
            if changes:
                self._enqueue(("fwd", changes, rlsn), sum(len(c[2]) for c in changes),
                              wake=False)
                changes = []
            item = ("2pc", kind, str(gtid), [(c[0], c[1], c[2]) for c in cs], payload,
                    [tuplify(k) for k in locks], rlsn)
            self._enqueue(item, sum(len(c[2]) for c in cs), wake=False)
        if changes:
            self._enqueue(("fwd", changes, lsn), sum(len(c[2]) for c in changes), wake=False)
        self.applied_lsn = lsn
        if self._applying:
            self._applyq_event.set()        # the applier takes ours after its own
        else:
            await self._apply_queued()
        await self._hold()
        await ch.send(wire.Ack(lsn, self._durable_for(self.sync_incarnation)))

    async def _hold(self) -> None:
        """Everything received so far is applied and written (in our image files: it
        survives `kill -9` of this server) -- forced too when every operation is."""
        await self._wait_applied()
        if self.forced:
            await self._force_applied()
        else:
            await self.fs.mgr.write()

    async def _on_snapshot(self, ch: wire.Channel, msg: wire.Snapshot) -> None:
        if await self._refuse(ch, msg):
            return
        if not self.sync_kind:
            self.sync_kind = msg.kind if isinstance(msg.kind, str) and msg.kind else "full"
            if self.sync_kind != "incremental":
                self._enqueue(("unsync", self.sync_incarnation, True), 0)
        self._enqueue(("snap", [(b, 0, d) for b, d in msg.blocks]), 4096 * len(msg.blocks))
        self.sync_progress = (msg.sent, msg.total)
        if msg.sent == msg.total or msg.sent % 1024 == 0:
            log.info("state transfer: %d of %d blocks", msg.sent, msg.total)
        await ch.send(wire.Ack(0, self._durable_for(self.sync_incarnation)))

    async def _on_sync_done(self, ch: wire.Channel, msg: wire.SyncDone) -> None:
        if await self._refuse(ch, msg):
            return
        self._enqueue(("synced", msg.incarnation, msg.lsn), 0)
        await self._hold()      # the state is ours before the primary acknowledges the view
        # forced at once: the primary's dirty map may then forget the transfer
        await self._force_applied()
        log.info("in sync with primary %s (incarnation %s, lsn %d)", msg.primary,
                 msg.incarnation, msg.lsn)
        await ch.send(wire.Ack(msg.lsn, self._durable_for(self.sync_incarnation)))

    async def _on_renew(self, ch: wire.Channel, msg: wire.Renew) -> None:
        if await self._refuse(ch, msg):
            return
        await ch.send(wire.Ack(0, self._durable_for(self.sync_incarnation)))

    async def _on_flush(self, ch: wire.Channel, msg: wire.Flush) -> None:
        if await self._refuse(ch, msg):
            return
        await self._wait_applied()
        await self._force_applied()
        await ch.send(wire.Ack(msg.lsn, self._durable_for(self.sync_incarnation)))
