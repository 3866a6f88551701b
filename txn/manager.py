"""Transactions over a block device: the `TxnManager`.

A transaction locks caller-named keys (strict 2PL, `locks.LockManager`), reads whole
blocks or byte ranges through the manager's buffer cache, and writes byte ranges: each
write appends an UPDATE record (old and new bytes) to the write-ahead log and then
changes the cached page. `commit()` appends COMMIT and forces the log (group commit);
pages are installed in place later (cache pressure, checkpoint), always after the log
covering them is durable (WAL), and possibly before their transaction commits (steal).
`abort()` undoes the transaction's updates in reverse order, logging a compensation
record (CLR) for each, then an ABORT record.

Byte-range records let two transactions change different bytes of one block: undo puts
back only the bytes the aborted transaction changed. The *caller* must lock so that two
live transactions never write overlapping bytes (the filesystem locks inodes and
entries); the manager itself takes no block locks.

Where the rest lives (mixins `TxnManager` inherits; all of them share its state):

- `transaction`: the `Txn` handle, `CommitRecord`, `Change` (re-exported here);
- `recovery`: `format`, `open` and the ARIES-style recovery;
- `checkpoint`: log-space reservations and checkpoints;
- `twophase`: PREPARE, in-doubt transactions, coordinator decisions;
- `ordered`: ordered-mode fresh writes (`Txn.write_fresh`);
- `publish`: the commit stream to subscribers and `apply` (replication).

This module keeps the core: begin/run, reads, logged writes, commit, abort and undo,
forcing, close and stats.
"""

from __future__ import annotations

import random
from typing import Any, Awaitable, Callable

import trio

from replfs.crash import crash_point
from replfs.raid.blockdev import BlockDevice

from .cache import BufferCache
from .checkpoint import CheckpointMixin
from .errors import Retryable, TxnAborted, TxnManagerFailed, TxnTooLarge
from .history import BlockRange, HistoryRecorder
from .locks import LockManager
from .log import Log
from .ordered import OrderedMixin
from .publish import PublishMixin
from .records import Abort, Clr, Commit, Decision, Update
from .recovery import RecoveryMixin
from .transaction import (ABORT_SIZE, COMMIT_SIZE, Change, CommitRecord, FreshChange, Txn,
                          _changes, _packed_len, _size, _Upd)
from .twophase import TwoPhaseMixin

__all__ = ["TxnManager", "Txn", "CommitRecord", "Change", "FreshChange"]

# A transaction with at least this many fresh blocks, in a manager that publishes at
# append, writes them after its COMMIT is appended, in a worker thread (`_commit`): a
# thread's hand-off costs more than it saves for a few blocks.
FRESH_BEHIND_BLOCKS = 32


class TxnManager(RecoveryMixin, CheckpointMixin, TwoPhaseMixin, OrderedMixin, PublishMixin):
    """The write-ahead log, buffer cache and lock table over one block device.

    Create the log once with `format`, then use `open` (which recovers). Every method
    must be called from within one trio run.
    """

    def __init__(self, device: BlockDevice, log: Log, *, cache_blocks: int,
                 history: HistoryRecorder | None, lock_timeout: float | None,
                 checkpoint_at: float):
        self.device = device
        self.log = log
        self.history = history
        self.locks = LockManager(lock_timeout)
        self.cache = BufferCache(device, cache_blocks, log.force)
        self.checkpoint_at = checkpoint_at
        self._ckpt_margin = min(4096, log.usable // 4)
        self._next_id = 1
        self._active: dict[int, Txn] = {}
        self._decisions: dict[Any, Decision] = {}
        self._subscribers: list[trio.MemorySendChannel] = []
        self._unpublished: list[tuple[int, CommitRecord]] = []
        # True: subscribers get each record when it is appended, not when it is durable
        self.publish_at_append = False
        # called (synchronously) with each record for subscribers as it is appended,
        # before any log write can carry it (a primary's write-ahead dirty map)
        self.on_append: Callable[[CommitRecord], None] | None = None
        self._ckpt_lock = trio.Lock()
        self._ckpt_done = trio.Event()
        self._ckpt_running = False
        self.closed = False
        self._stats = dict(commits=0, aborts=0, retries=0, checkpoints=0, log_full_waits=0,
                           log_full_aborts=0, lazy_commits=0, fresh_blocks=0,
                           fresh_logged=0)
        self.recovery: dict[str, Any] = {}
        # Ordered mode (`Txn.write_fresh`): the LSN from which a recovery now would redo
        # (None until this manager's first checkpoint is durable), and the last LSN of
        # an UPDATE/CLR of each block logged since then (older entries are pruned).
        self._redo_from: int | None = None
        self._logged: dict[int, int] = {}

    # ---- transactions -----------------------------------------------------------------

    def begin(self, name: str | None = None, *, priority: float | None = None) -> Txn:
        """Start a transaction (no log record until its first write).

        `priority` is its age for deadlock victim choice (default: now); `run` passes
        the first attempt's time to every retry."""
        if self.closed:
            raise TxnAborted("transaction manager is closed")
        # After a log failure a transaction may still read (the filesystem's failsafe
        # mode serves reads); its first write raises TxnManagerFailed from the log.
        txn = Txn(self, self._next_id, name,
                  trio.current_time() if priority is None else priority)
        self._next_id += 1
        self._active[txn.id] = txn
        return txn

    async def run(self, fn: Callable[[Txn], Awaitable[Any]], name: str | None = None, *,
                  retries: int = 1000) -> Any:
        """Run ``await fn(txn)`` in a transaction and commit it; return fn's result.

        `Deadlock`, `LockTimeout` and `LogFull` abort the attempt and retry it after a
        randomized exponential backoff (the caller never sees them unless `retries`
        attempts all fail). Any other exception aborts (every effect undone) and is
        re-raised. `fn` may commit the transaction itself (e.g. to get the CommitRecord).
        If `fn` prepared it (2PC), it is left prepared -- committed or aborted or not,
        only the coordinator's decision may end it; `fn` must hand the Txn out.
        """
        priority = trio.current_time()
        attempt = 0
        while True:
            txn = self.begin(name, priority=priority)
            try:
                result = await fn(txn)
                if txn.state == "active":
                    await txn.commit()
                return result
            except Retryable:
                await txn.abort()
                attempt += 1
                self._stats["retries"] += 1
                if attempt > retries:
                    raise
                await trio.sleep(random.uniform(0, min(0.05, 0.0005 * 2 ** min(attempt, 10))))
            except BaseException:
                if txn.state != "prepared":
                    await txn.abort()
                raise

    # ---- the work behind Txn's methods -------------------------------------------------

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.device.nblocks:
            raise ValueError(f"block {block} outside the device (0..{self.device.nblocks - 1})")
        if self.log.log_start <= block < self.log.log_start + self.log.log_blocks:
            raise ValueError(f"block {block} belongs to the log region")

    async def _read(self, txn: Txn, block: int, offset: int, size: int | None) -> bytes:
        self._check_block(block)
        bs = self.device.block_size
        size = bs - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > bs:
            raise ValueError(f"range {offset}+{size} outside a {bs}-byte block")
        fresh = txn.fresh.get(block)
        if fresh is not None:
            data = fresh[offset:offset + size]
            if self.history is not None:
                self.history.read(txn.id, BlockRange(block, offset, offset + size))
            return data
        page = await self.cache.get(block)
        data = bytes(page.data[offset:offset + size])
        if self.history is not None:
            self.history.read(txn.id, BlockRange(block, offset, offset + size))
        return data

    async def _read_many(self, txn: Txn, blocks: list[int]) -> list[bytes]:
        bs = self.device.block_size
        out: list[bytes | None] = [None] * len(blocks)
        misses: list[int] = []
        pages = self.cache.pages
        for i, b in enumerate(blocks):
            self._check_block(b)
            page = pages.get(b)
            if page is not None:
                out[i] = bytes(page.data)
            else:
                misses.append(i)
        j = 0
        while j < len(misses):
            k = j
            while k + 1 < len(misses) and blocks[misses[k + 1]] == blocks[misses[k]] + 1:
                k += 1
            start, count = blocks[misses[j]], k - j + 1
            data = await self.device.read_blocks(start, count)
            for m in range(count):
                i = misses[j + m]
                # a miss means the device holds the latest bytes (pages leave the cache
                # only once installed); re-check in case someone loaded it meanwhile
                page = pages.get(start + m)
                out[i] = bytes(page.data) if page is not None else data[m * bs:(m + 1) * bs]
            j = k + 1
        if self.history is not None:
            for b in blocks:
                self.history.read(txn.id, BlockRange(b, 0, bs))
        return out  # type: ignore[return-value]

    async def _write(self, txn: Txn, block: int, offset: int, data: bytes, undo: bool) -> None:
        self._check_block(block)
        if txn.fresh and block in txn.fresh:
            # written fresh by this transaction, now changed in part: log it whole first
            await self._write(txn, block, 0, txn.fresh.pop(block), False)
        n = len(data)
        bs = self.device.block_size
        if offset < 0 or offset + n > bs:
            raise ValueError(f"range {offset}+{n} outside a {bs}-byte block")
        if n == 0:
            return
        need = _size(2 * n if undo else n)
        keep = (_size(n) if undo else 0) + (ABORT_SIZE if txn.first_lsn is None else 0)
        if txn.log_bytes + need + keep + COMMIT_SIZE > self.max_txn_bytes:
            raise TxnTooLarge(f"transaction {txn.id} would need more than {self.max_txn_bytes} "
                              f"bytes of log (the whole log holds {self.log.usable})")
        await self._reserve(need + keep)
        txn.log_bytes += need + keep
        txn.reserved += keep
        try:
            page = await self.cache.get(block, overwrite=not undo and offset == 0 and n == bs)
            txn._check_usable()
        except BaseException:
            self.log.reserved -= need
            raise
        # from here to the end: no await, so log record and page change are one step
        old = bytes(page.data[offset:offset + n]) if undo else None
        lsn, end = self.log.append(Update(txn.id, block, offset, data, old), reserved=need)
        self._logged[block] = lsn
        page.data[offset:offset + n] = data
        self.cache.changed(page, end)
        txn.updates.append(_Upd(lsn, block, offset, old, data))
        if txn.first_lsn is None:
            txn.first_lsn = lsn
        if self.history is not None:
            self.history.write(txn.id, BlockRange(block, offset, offset + n))
        crash_point("txn.write.logged")

    async def _commit(self, txn: Txn, payload: Any, durable: bool = True,
                      release_early: bool = False) -> CommitRecord:
        prepared = txn.state == "prepared"
        # ordered: the data in place before its COMMIT is written; usually before the
        # COMMIT is even appended, but a large transaction of a manager that publishes at
        # append (a replicating primary) appends first and holds the log back until its
        # data is in place, written in a worker thread while subscribers ship the commit
        behind = (prepared is False and len(txn.fresh) >= FRESH_BEHIND_BLOCKS
                  and self.publish_at_append and bool(self._subscribers)
                  and hasattr(self.device, "write_sync"))
        if txn.fresh and not prepared and not behind:
            await self._write_fresh_blocks(txn)
        if not (txn.updates or txn.fresh or prepared or payload is not None):
            rec = CommitRecord(None, txn.id, (), None)   # read-only: nothing to log
            await self._finish(txn, "committed")
            return rec
        if prepared and payload is None:
            size, from_txn = COMMIT_SIZE, True
        else:
            size, from_txn = _size(_packed_len(payload)), False
            await self._reserve(size)
        # From the append on, the transaction is committed as soon as the log reaches
        # the disk, whatever happens to this task: on cancellation the rest is finished
        # shielded (not shielding the common path: a CancelScope per commit is costly).
        hold = self.log.hold() if behind else None
        lsn, end = self.log.append(Commit(txn.id, payload), reserved=size)
        if from_txn:
            txn.reserved -= size
        rec = CommitRecord(lsn, txn.id, _changes(txn),
                           txn.payload if payload is None else payload)
        txn.commit_record = rec
        txn.state = "committing"
        if self._subscribers:
            self._queue_publish(end, rec)
        crash_point("txn.commit.appended")
        if hold is not None:
            await self._fresh_behind(txn, hold)
        if not durable and not prepared:
            self._stats["lazy_commits"] += 1
            await self._finish(txn, "committed")
            if self.log.used > self.checkpoint_at * self.log.usable and not self._ckpt_running:
                await self.checkpoint()
            return rec
        if release_early:
            # committed for everyone from here on (whoever reads it now logs after this
            # COMMIT, so cannot be durable without it); durable when this returns
            await self._finish(txn, "committed")
            with trio.CancelScope(shield=True):
                await self.log.force(end)       # TxnManagerFailed: the log is dead
                self._publish()
            if self.log.used > self.checkpoint_at * self.log.usable and not self._ckpt_running:
                await self.checkpoint()
            return rec
        try:
            await self.log.force(end)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._force_or_fail(txn, end)
                await self._commit_durable(txn)
            raise
        except TxnManagerFailed:
            with trio.CancelScope(shield=True):
                await self._fail_commit(txn)
            raise
        await self._commit_durable(txn)
        if self.log.used > self.checkpoint_at * self.log.usable and not self._ckpt_running:
            await self.checkpoint()
        return rec

    async def _fresh_behind(self, txn: Txn, hold: int) -> None:
        """Write `txn`'s fresh blocks after its COMMIT was appended (and published), then
        let the log write the COMMIT. If they cannot be written, this log must never
        carry the COMMIT: the log fails (the manager serves reads only, as after any log
        failure) and the transaction counts as aborted here."""
        with trio.CancelScope(shield=True):
            try:
                await self._write_fresh_blocks(txn, threaded=True)
            except Exception as exc:
                if self.log.failed is None:
                    self.log.failed = exc
                self.log.release(hold)
                await self._fail_commit(txn)
                raise TxnManagerFailed(f"the data of a commit could not be written: "
                                       f"{exc!r}") from exc
            self.log.release(hold)

    async def _force_or_fail(self, txn: Txn, end: int) -> None:
        try:
            await self.log.force(end)
        except TxnManagerFailed:
            await self._fail_commit(txn)
            raise

    async def _fail_commit(self, txn: Txn) -> None:
        """The log died before this COMMIT was known durable: it may or may not be on
        disk (recovery decides); the live manager treats it as aborted."""
        await self._undo(txn)
        await self._finish(txn, "aborted")

    async def _commit_durable(self, txn: Txn) -> None:
        crash_point("txn.commit.durable")
        self._publish()
        await self._finish(txn, "committed")

    async def _abort(self, txn: Txn) -> None:
        if txn.state in ("committed", "aborted", "committing"):
            return
        with trio.CancelScope(shield=True):
            was_prepared = txn.state == "prepared"
            txn.state = "aborting"
            try:
                await self._undo(txn)
                if txn.first_lsn is not None and self.log.failed is None:
                    lsn, end = self.log.append(Abort(txn.id), reserved=ABORT_SIZE)
                    txn.reserved -= ABORT_SIZE
                    if was_prepared and self._subscribers:
                        self._queue_publish(end, CommitRecord(
                            lsn, txn.id, tuple(Change(u.block, u.offset, u.old)
                                               for u in reversed(txn.updates)
                                               if u.old is not None),
                            txn.payload, "abort"))
                    crash_point("txn.abort.logged")
                    if was_prepared:   # the coordinator may forget us once we answer
                        await self.log.force(end)
                        self._publish()
            finally:
                await self._finish(txn, "aborted")

    async def _undo(self, txn: Txn) -> None:
        """Put back the old bytes of `txn`'s updates, newest first, logging a CLR each.

        After a log failure nothing can be logged (nor installed: the log never becomes
        durable again), so the undo is done in memory only -- readers of the live manager
        see the old state, and the locks can still be released."""
        for u in reversed(txn.updates):
            if u.old is None:
                continue
            page = await self.cache.get(u.block)
            end = None
            if self.log.failed is None:
                size = _size(len(u.old))
                try:
                    _, end = self.log.append(Clr(txn.id, u.block, u.offset, u.old, u.lsn),
                                             reserved=size)
                    txn.reserved -= size
                except TxnManagerFailed:
                    end = None
            page.data[u.offset:u.offset + len(u.old)] = u.old
            if end is not None:
                self._logged[u.block] = end
                self.cache.changed(page, end)
                crash_point("txn.abort.clr")

    async def _finish(self, txn: Txn, state: str) -> None:
        self.log.reserved -= txn.reserved
        txn.reserved = 0
        txn.state = state
        self._active.pop(txn.id, None)
        if self.history is not None:
            (self.history.commit if state == "committed" else self.history.abort)(txn.id)
        self._stats["commits" if state == "committed" else "aborts"] += 1
        try:
            if state == "committed":
                for fn in txn.on_commit:
                    fn()
        finally:
            await self.locks.release_all(txn)

    # ---- force / close / stats ----------------------------------------------------------

    @property
    def failed(self) -> str | None:
        """Why the log cannot be written any more (a device error), or None.

        Once set: writes and commits raise `TxnManagerFailed`, reads still work (and see
        the committed state plus nothing of failed transactions); reopen to recover."""
        return None if self.log.failed is None else repr(self.log.failed)

    async def force(self) -> None:
        """Make every record appended so far durable (commits already are when they return;
        this also covers lazy commits, decisions forgotten and aborts logged since)."""
        await self.log.force()
        self._publish()

    async def write(self) -> None:
        """Make every record appended so far *written*: in the device's files, so that it
        survives the crash of this process (not a power loss: that takes `force`). A lazy
        commit followed by `write` is what a replicating primary acknowledges."""
        await self.log.force(sync=False)

    async def flush_behind(self, interval: float = 1.0) -> None:
        """Run forever (in the caller's nursery): force the log every `interval` seconds
        when lazy commits are waiting, so none stays volatile for long."""
        while True:
            await trio.sleep(interval)
            if self.closed:
                return
            if self.log.durable_lsn < self.log.end_lsn and self.log.failed is None:
                try:
                    await self.force()
                except TxnManagerFailed:
                    return

    async def close(self) -> None:
        """Abort live (not prepared) transactions, take a checkpoint, refuse new work.

        Prepared transactions stay in the log, in doubt at the next open."""
        if self.closed:
            return
        for txn in list(self._active.values()):
            if txn.state == "active":
                await txn.abort()
        if self.log.failed is None:
            await self.checkpoint()
        self.closed = True
        for ch in self._subscribers:
            ch.close()
        self._subscribers.clear()

    def unsettled(self, block: int) -> bool:
        """A live (active or prepared) transaction changed `block`: what the device holds
        of it may be bytes that no committed state has (stolen or written fresh before
        the commit). A copy of the block from elsewhere must not replace it then."""
        return any(block in t.fresh or any(u.block == block for u in t.updates)
                   for t in self._active.values())

    def stats(self) -> dict[str, Any]:
        """Counters and gauges (JSON-able) for `replfs status` and the benchmarks."""
        ls = self.locks.statistics()
        c = self.cache
        return dict(
            self._stats,
            active=len(self._active),
            in_doubt=len(self.in_doubt()),
            deadlocks=ls.deadlocks,
            lock_waits=ls.waits,
            lock_timeouts=ls.timeouts,
            locks_held=ls.keys_locked,
            log_bytes_used=self.log.used,
            log_bytes_reserved=self.log.reserved,
            log_size=self.log.usable,
            log_bytes_written=self.log.bytes_written,
            log_flushes=self.log.flushes,
            log_writes=self.log.writes,
            durable_lsn=self.log.durable_lsn,
            written_lsn=self.log.written_lsn,
            cache_pages=len(c.pages),
            cache_dirty=c.dirty_count(),
            cache_hits=c.hits,
            cache_misses=c.misses,
            cache_installs=c.installs,
            cache_evictions=c.evictions,
            decisions=len(self._decisions),
            failed=self.failed,
            recovery=dict(self.recovery),
        )
