"""Transactions over a block device: the `TxnManager` and its `Txn` objects.

A transaction locks caller-named keys (strict 2PL, `locks.LockManager`), reads whole
blocks or byte ranges through the manager's buffer cache, and writes byte ranges: each
write appends an UPDATE record (old and new bytes) to the write-ahead log and then
changes the cached page. `commit()` appends COMMIT and forces the log (group commit);
pages are installed in place later (cache pressure, checkpoint), always after the log
covering them is durable (WAL), and possibly before their transaction commits (steal).
`abort()` undoes the transaction's updates in reverse order, logging a compensation
record (CLR) for each, then an ABORT record.

Recovery (`TxnManager.open`), ARIES-style:

1. *Scan* the log from the header's start LSN to the first invalid record (torn tail),
   then write the header with epoch + 1 so that nothing stale beyond that end can ever
   validate again.
2. *Analysis*: per transaction its updates, its compensated updates (CLRs) and its fate
   (COMMIT, ABORT, PREPARE); the last CHECKPOINT gives the redo LSN, the next
   transaction id and the coordinator decisions.
3. *Redo* (repeat history): apply every UPDATE and CLR from the redo LSN on, winners and
   losers alike, in log order.
4. *Undo*: the losers' (no COMMIT/ABORT/PREPARE) uncompensated updates, newest first
   across all losers, each logged as a CLR before it is applied; then an ABORT per loser.
   A crash during recovery is recovered again: the CLRs already written make the second
   undo skip what the first one did.
5. Prepared transactions stay *in doubt*: their X locks are re-taken from the PREPARE
   record and they wait for `commit()` / `abort()` (`TxnManager.in_doubt()`).
6. A checkpoint installs everything and truncates the log.

Byte-range records let two transactions change different bytes of one block: undo puts
back only the bytes the aborted transaction changed. The *caller* must lock so that two
live transactions never write overlapping bytes (the filesystem locks inodes and
entries); the manager itself takes no block locks.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Iterable, NamedTuple

import msgpack
import trio

from replfs.crash import crash_point
from replfs.raid.blockdev import BlockDevice

from .cache import BufferCache
from .errors import LogFull, Retryable, TxnAborted, TxnManagerFailed, TxnTooLarge
from .history import BlockRange, HistoryRecorder
from .locks import LockManager
from .log import Log
from .records import (FRAME_SIZE, RECORD_OVERHEAD, Abort, Checkpoint, Clr, Commit, Decision,
                      Forget, Prepare, Update)

ABORT_SIZE = FRAME_SIZE + RECORD_OVERHEAD
COMMIT_SIZE = FRAME_SIZE + RECORD_OVERHEAD


def _size(nbytes: int) -> int:
    """Upper bound of a record's framed size whose byte strings total `nbytes`."""
    return FRAME_SIZE + RECORD_OVERHEAD + nbytes


def _packed_len(obj: Any) -> int:
    return len(msgpack.packb(obj, use_bin_type=True))


class Change(NamedTuple):
    """One byte-range after-image: `data` was written at `offset` of `block`."""
    block: int
    offset: int
    data: bytes
    fresh = False


class FreshChange(Change):
    """A whole new block that nobody could see before (written in place, not logged)."""
    __slots__ = ()
    fresh = True


def _changes(txn) -> tuple[Change, ...]:
    """The after-images a transaction's records ship: its logged updates, then its
    fresh blocks."""
    out = tuple(Change(u.block, u.offset, u.new) for u in txn.updates)
    if txn.fresh:
        out += tuple(FreshChange(b, 0, d) for b, d in txn.fresh.items())
    return out


@dataclass(frozen=True)
class CommitRecord:
    """What replication ships for a committed transaction, in commit (LSN) order.

    `lsn` is the COMMIT record's LSN (None for a read-only transaction, which logs
    nothing and is not published).

    Subscribers also receive, in the same LSN order, the 2PC events of a transaction:
    `kind="prepare"` once its PREPARE is durable (`changes` = its after-images so far,
    `locks` = the X-locked keys, `payload` = the PREPARE payload), then either
    `kind="commit"` (changes = all its after-images, payload = the PREPARE payload) or
    `kind="abort"` (changes = the before-images its undo put back, newest first)."""
    lsn: int | None
    txn: int
    changes: tuple[Change, ...]
    payload: Any = None
    kind: str = "commit"
    locks: tuple = ()


class _Upd(NamedTuple):
    lsn: int
    block: int
    offset: int
    old: bytes | None
    new: bytes


class Txn:
    """One transaction. Create with `TxnManager.begin()` (or let `TxnManager.run` do it).

    States: active -> (prepared) -> committed | aborted. After `Deadlock`,
    `LockTimeout`, `LogFull` or any other error the caller must `abort()`; every
    operation but `abort()` on a doomed or finished transaction raises `TxnAborted`.
    """

    def __init__(self, mgr: "TxnManager", txn_id: int, name: str | None, priority: float):
        self.mgr = mgr
        self.id = txn_id
        self.name = name
        self.priority = priority   # first-attempt time: smaller = older (deadlock victim choice)
        self.doomed = False
        self.state = "active"
        self.updates: list[_Upd] = []
        self.first_lsn: int | None = None
        self.reserved = 0          # log bytes promised to this txn's CLRs/ABORT/COMMIT
        self.log_bytes = 0         # log bytes this txn has used and promised so far
        self.payload: Any = None   # PREPARE payload
        self.commit_record: CommitRecord | None = None
        # whole new blocks written in place at commit instead of logged (`write_fresh`)
        self.fresh: dict[int, bytes] = {}
        # called (synchronously) once committed, before its locks are released: what a
        # layer above caches of the committed state is then updated in commit order
        self.on_commit: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<Txn {self.id} {self.name or ''} {self.state}>"

    def _check_usable(self, *states: str) -> None:
        if self.doomed:
            raise TxnAborted(f"transaction {self.id} was chosen as a deadlock victim; abort it")
        if self.state not in (states or ("active",)):
            raise TxnAborted(f"transaction {self.id} is {self.state}")

    async def lock(self, key: Hashable, mode: str = "X", timeout: float | None = None) -> None:
        """Lock `key` ("S" or "X"; S -> X upgrades) until commit/abort.

        Raises `Deadlock` (this txn was chosen as victim) or `LockTimeout`; the caller
        must then abort (`TxnManager.run` does, and retries)."""
        self._check_usable()
        await self.mgr.locks.acquire(self, key, mode, timeout)

    def lock_nowait(self, key: Hashable, mode: str = "X") -> None:
        """Lock `key` now or raise `trio.WouldBlock`."""
        self._check_usable()
        self.mgr.locks.acquire_nowait(self, key, mode)

    async def read(self, block: int, offset: int = 0, size: int | None = None) -> bytes:
        """Current bytes ``[offset, offset+size)`` of `block` (default: the whole block),
        including this transaction's own writes and other live transactions' writes
        (locks are what keeps those apart). Recorded in the history as that range."""
        self._check_usable("active", "prepared")
        return await self.mgr._read(self, block, offset, size)

    async def read_blocks(self, blocks: list[int]) -> list[bytes]:
        """Whole blocks, in the order asked: cached pages as they are (this
        transaction's and other committed writes included), the others read from the
        device in contiguous runs without entering the cache (a bulk read does not
        push out the working set)."""
        self._check_usable()
        return await self.mgr._read_many(self, blocks)

    async def write(self, block: int, offset: int, data: bytes, undo: bool = True) -> None:
        """Replace bytes ``[offset, offset+len(data))`` of `block`; logs UPDATE first.

        ``undo=False`` logs only the new bytes: the update is never undone, not even if
        the transaction aborts or is a loser at recovery -- for blocks whose old contents
        nobody can see (e.g. freshly allocated data blocks). May wait for log space;
        raises `LogFull` if none can be made."""
        self._check_usable()
        await self.mgr._write(self, block, offset, bytes(data), undo)

    async def write_fresh(self, block: int, data: bytes) -> None:
        """Write all of `block`, a block nobody can see the old contents of (freshly
        allocated, not yet referenced by anything committed) -- ordered mode: the
        bytes go in place, unlogged, before the COMMIT record is appended, so a crash
        leaves either the committed transaction with its data, or a block still free.
        Falls back to a logged `write(undo=False)` where recovery would replay older
        records of the block over it (it was logged since the last checkpoint)."""
        self._check_usable()
        await self.mgr._write_fresh(self, block, bytes(data))

    def record_read(self, key: Hashable) -> None:
        """Add a read of a caller-named object to the history (if one is recorded)."""
        if self.mgr.history is not None:
            self.mgr.history.read(self.id, key)

    def record_write(self, key: Hashable) -> None:
        if self.mgr.history is not None:
            self.mgr.history.write(self.id, key)

    async def prepare(self, payload: Any = None) -> int:
        """2PC vote YES: log PREPARE (payload + X-locked keys) and force it; returns its LSN.

        Afterwards the transaction can only `commit()` or `abort()`; it survives a crash
        in doubt (see `TxnManager.in_doubt`)."""
        self._check_usable()
        return await self.mgr._prepare(self, payload)

    async def commit(self, payload: Any = None, *, durable: bool = True) -> CommitRecord:
        """Log COMMIT (with `payload`), force the log, release the locks.

        Returns the `CommitRecord`, also published to subscribers in commit order.
        Once it returns, the transaction survives any crash.

        `durable=False` (a lazy commit, as a journaling filesystem's write(2)): the
        COMMIT is appended but not forced, and the locks are released at once. A
        prepared transaction always commits durably (its coordinator may forget the
        decision once it answers). The
        transaction is committed for everyone who runs after it, and becomes durable
        with the next force (any durable commit, `TxnManager.force()`, or
        `flush_behind`); a crash before then loses it whole, never in part, and never
        without everything that committed after it (the log is one sequence)."""
        self._check_usable("active", "prepared")
        return await self.mgr._commit(self, payload, durable=durable)

    async def abort(self) -> None:
        """Undo this transaction's updates (logging CLRs), log ABORT, release the locks.

        Idempotent; never raises for contention; shielded from cancellation."""
        await self.mgr._abort(self)


class TxnManager:
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

    # ---- creation -------------------------------------------------------------------

    @classmethod
    async def format(cls, device: BlockDevice, *, log_start: int, log_blocks: int) -> None:
        """Make an empty log in ``[log_start, log_start + log_blocks)`` (destroys the old one)."""
        log = Log(device, log_start, log_blocks)
        await log.format()
        log.append(Checkpoint(0, 1, [], []))
        await log.force()

    @classmethod
    async def open(cls, device: BlockDevice, *, log_start: int, log_blocks: int,
                   cache_blocks: int = 1024, history: HistoryRecorder | None = None,
                   lock_timeout: float | None = 10.0, group_commit: bool = True,
                   checkpoint_at: float = 0.5) -> "TxnManager":
        """Open the log and recover (see the module docstring); returns a ready manager.

        `checkpoint_at`: a commit that finds the log fuller than this fraction takes a
        checkpoint. `group_commit=False` makes every force do its own flush (the
        benchmark's baseline). Raises `LogCorrupt` when there is no valid log header.
        """
        log = Log(device, log_start, log_blocks, group_commit)
        hdr = await log.read_header()
        t0 = time.perf_counter()
        records = await log.scan()
        crash_point("txn.recovery.scanned")
        scanned = log.end_lsn - log.start_lsn
        await log.write_header(epoch=hdr.epoch + 1)
        crash_point("txn.recovery.epoch")
        mgr = cls(device, log, cache_blocks=cache_blocks, history=history,
                  lock_timeout=lock_timeout, checkpoint_at=checkpoint_at)
        await mgr._recover(records)
        mgr.recovery.update(log_bytes=scanned, records=len(records),
                            seconds=time.perf_counter() - t0)
        return mgr

    async def _recover(self, records) -> None:
        infos: dict[int, dict] = {}
        redo_lsn = self.log.start_lsn
        next_id = 1
        for lsn, end, rec in records:
            if isinstance(rec, Checkpoint):
                redo_lsn = rec.redo_lsn
                next_id = max(next_id, rec.next_txn)
                self._decisions = {g: Decision(g, c, ps) for g, c, ps in rec.decisions}
                continue
            if isinstance(rec, Decision):
                self._decisions[rec.gtid] = rec
                continue
            if isinstance(rec, Forget):
                self._decisions.pop(rec.gtid, None)
                continue
            info = infos.setdefault(rec.txn, dict(status="active", updates=[], clrs=set(),
                                                  first=lsn, payload=None, locks=[]))
            next_id = max(next_id, rec.txn + 1)
            if isinstance(rec, Update):
                info["updates"].append(_Upd(lsn, rec.block, rec.offset, rec.old, rec.new))
            elif isinstance(rec, Clr):
                info["clrs"].add(rec.compensates)
            elif isinstance(rec, Commit):
                info["status"] = "committed"
            elif isinstance(rec, Abort):
                info["status"] = "aborted"
            elif isinstance(rec, Prepare):
                info.update(status="prepared", payload=rec.payload, locks=rec.locks)
        self._next_id = next_id

        # redo: repeat history from the last checkpoint's redo point
        redone = 0
        for lsn, end, rec in records:
            if lsn >= redo_lsn and isinstance(rec, (Update, Clr)):
                page = await self.cache.get(rec.block)
                page.data[rec.offset:rec.offset + len(rec.new)] = rec.new
                self.cache.changed(page, end)
                redone += 1
        crash_point("txn.recovery.redone")

        # undo the losers, newest update first; a prepared txn whose abort had begun
        # (it has CLRs) is finished off too
        losers = sorted(t for t, i in infos.items()
                        if i["status"] == "active" or (i["status"] == "prepared" and i["clrs"]))
        todo = sorted(((u, t) for t in losers for u in infos[t]["updates"]
                       if u.old is not None and u.lsn not in infos[t]["clrs"]), reverse=True)
        for u, t in todo:
            page = await self.cache.get(u.block)
            _, end = self.log.append(Clr(t, u.block, u.offset, u.old, u.lsn))
            page.data[u.offset:u.offset + len(u.old)] = u.old
            self.cache.changed(page, end)
            crash_point("txn.recovery.undo")
        for t in losers:
            self.log.append(Abort(t))
        await self.log.force()
        crash_point("txn.recovery.undone")

        in_doubt = 0
        for t, info in sorted(infos.items()):
            if info["status"] != "prepared" or t in losers:
                continue
            txn = Txn(self, t, "in-doubt", priority=-math.inf)
            txn.state = "prepared"
            txn.updates = list(info["updates"])
            txn.first_lsn = info["first"]
            txn.payload = info["payload"]
            txn.reserved = (ABORT_SIZE + COMMIT_SIZE
                            + sum(_size(len(u.old)) for u in txn.updates if u.old is not None))
            self.log.reserved += txn.reserved
            for key in info["locks"]:
                self.locks.acquire_nowait(txn, key, "X")
            self._active[t] = txn
            in_doubt += 1
        self.recovery = dict(redone=redone, undone=len(todo), losers=len(losers),
                             in_doubt=in_doubt,
                             winners=sum(1 for i in infos.values() if i["status"] == "committed"))
        await self.checkpoint()
        crash_point("txn.recovery.done")

    # ---- transactions -----------------------------------------------------------------

    @property
    def max_txn_bytes(self) -> int:
        """The most log one transaction may use (UPDATE records with their undo reserve:
        about 3x the bytes written with undo, 1x with undo=False, plus ~100 bytes per
        write). Beyond it `TxnTooLarge` is raised."""
        return self.log.usable - 2 * self._ckpt_margin

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

    async def apply(self, changes: Iterable[tuple], payload: Any = None,
                    *, durable: bool = True, undo: bool = True) -> CommitRecord:
        """Apply a primary's committed changes as one local transaction (the backup side).

        Takes no locks: replicated transactions must be applied one at a time, in the
        primary's commit order, and not concurrently with local writers of the same bytes.
        `durable=False` commits lazily (see `Txn.commit`); `undo=False` logs after-images
        only (a crash in the middle may then leave part of the changes: only for a caller
        that re-applies them after a crash, as a backup re-synchronises).
        """
        changes = [(FreshChange if len(c) > 3 and c[3] else Change)(c[0], c[1], bytes(c[2]))
                   for c in changes]
        bs = self.device.block_size

        async def fn(txn: Txn) -> CommitRecord:
            for c in changes:
                if c.fresh and c.offset == 0 and len(c.data) == bs:
                    await txn.write_fresh(c.block, c.data)
                else:
                    await txn.write(c.block, c.offset, c.data, undo=undo)
            return await txn.commit(payload, durable=durable)

        return await self.run(fn, name="apply")

    def subscribe(self, max_buffer: float = math.inf) -> trio.MemoryReceiveChannel:
        """A channel receiving every `CommitRecord`, in commit order, once it is durable
        (or once it is appended: `publish_at_append`).

        A subscriber whose bounded buffer is full, or who closed its end, is dropped."""
        send, recv = trio.open_memory_channel(max_buffer)
        self._subscribers.append(send)
        return recv

    def in_doubt(self) -> list[Txn]:
        """Prepared transactions not yet committed or aborted (after recovery: in doubt).

        Each has ``.payload`` (the PREPARE payload) and holds its X locks again."""
        return [t for t in self._active.values() if t.state == "prepared"]

    async def log_decision(self, gtid: Hashable, commit: bool, participants: list) -> int:
        """2PC coordinator: log and force DECISION; returns its LSN. Kept (across
        checkpoints) until `forget_decision`."""
        rec = Decision(gtid, bool(commit), list(participants))
        size = _size(_packed_len([gtid, participants]))
        await self._reserve(size)
        lsn, end = self.log.append(rec, reserved=size)
        self._decisions[gtid] = rec
        crash_point("txn.decision.appended")
        await self.log.force(end)
        crash_point("txn.decision.durable")
        return lsn

    def decisions(self) -> dict[Hashable, Decision]:
        """Logged coordinator decisions not yet forgotten: ``{gtid: Decision}``."""
        return dict(self._decisions)

    async def forget_decision(self, gtid: Hashable) -> None:
        """Drop a decision every participant has acknowledged (logged, not forced)."""
        if gtid not in self._decisions:
            return
        size = _size(_packed_len(gtid))
        await self._reserve(size)
        self.log.append(Forget(gtid), reserved=size)
        del self._decisions[gtid]

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

    async def _write_fresh(self, txn: Txn, block: int, data: bytes) -> None:
        self._check_block(block)
        if len(data) != self.device.block_size:
            raise ValueError(f"a fresh write is a whole block, not {len(data)} bytes")
        if self._redo_from is None or self._logged.get(block, -1) >= self._redo_from:
            # recovery would redo older records of this block over the new bytes
            self._stats["fresh_logged"] += 1
            await self._write(txn, block, 0, data, False)
            return
        txn.fresh[block] = data
        if self.history is not None:
            self.history.write(txn.id, BlockRange(block, 0, len(data)))

    async def _write_fresh_blocks(self, txn: Txn) -> None:
        """Before the COMMIT (or PREPARE) record: the transaction's fresh blocks in place;
        a cached page of one (left from its previous life) takes the new bytes."""
        fresh = txn.fresh
        await self.device.write_blocks(fresh)
        crash_point("txn.commit.fresh_written")
        for block, data in fresh.items():
            page = self.cache.pages.get(block)
            if page is not None:
                page.data[:] = data
                page.version += 1
        self._stats["fresh_blocks"] += len(fresh)

    async def _reserve(self, nbytes: int) -> None:
        """Promise `nbytes` of log space, waiting for a checkpoint to free some if needed.

        Raises `LogFull` when a checkpoint (taken by this task) did not free enough:
        live transactions pin the tail; aborting this one may let them finish."""
        while self.log.free() - self._ckpt_margin < nbytes:
            if nbytes > self.max_txn_bytes:
                raise TxnTooLarge(f"a {nbytes}-byte record cannot fit in a log of "
                                  f"{self.log.usable} bytes")
            self._stats["log_full_waits"] += 1
            if self._ckpt_running:
                await self._ckpt_done.wait()
                continue
            await self.checkpoint()
            if self.log.free() - self._ckpt_margin < nbytes:
                self._stats["log_full_aborts"] += 1
                raise LogFull(f"log full ({self.log.used} of {self.log.usable} bytes used, "
                              f"{self.log.reserved} reserved) even after a checkpoint")
        self.log.reserved += nbytes

    async def _prepare(self, txn: Txn, payload: Any) -> int:
        if txn.fresh:
            await self._write_fresh_blocks(txn)
        locks = [k for k, m in self.locks.held(txn).items() if m == "X"]
        size = _size(_packed_len([payload, locks]))
        keep = COMMIT_SIZE + (ABORT_SIZE if txn.first_lsn is None else 0)
        await self._reserve(size + keep)
        txn.reserved += keep
        lsn, end = self.log.append(Prepare(txn.id, payload, locks), reserved=size)
        if txn.first_lsn is None:
            txn.first_lsn = lsn
        txn.payload = payload
        txn.state = "preparing"
        if self._subscribers:
            self._queue_publish(end, CommitRecord(
                lsn, txn.id, _changes(txn), payload, "prepare", tuple(locks)))
        crash_point("txn.prepare.appended")
        with trio.CancelScope(shield=True):
            await self.log.force(end)
        txn.state = "prepared"
        crash_point("txn.prepare.durable")
        self._publish()
        return lsn

    async def _commit(self, txn: Txn, payload: Any, durable: bool = True) -> CommitRecord:
        prepared = txn.state == "prepared"
        if txn.fresh and not prepared:
            await self._write_fresh_blocks(txn)    # ordered: the data before its COMMIT
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
        if not durable and not prepared:
            self._stats["lazy_commits"] += 1
            await self._finish(txn, "committed")
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

    def _queue_publish(self, end: int, rec: CommitRecord) -> None:
        """Subscribers get `rec` once the log is durable up to `end` -- or at once, in
        append (LSN) order, with `publish_at_append` (a replicating primary: its backup
        holds a record before the primary's own disk does)."""
        if self.publish_at_append:
            self._send(rec)
        else:
            self._unpublished.append((end, rec))

    def _send(self, rec: CommitRecord) -> None:
        for ch in list(self._subscribers):
            try:
                ch.send_nowait(rec)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(ch)

    def _publish(self) -> None:
        durable = self.log.durable_lsn
        n = 0
        while n < len(self._unpublished) and self._unpublished[n][0] <= durable:
            n += 1
        ready, self._unpublished = self._unpublished[:n], self._unpublished[n:]
        for _, rec in ready:
            self._send(rec)

    # ---- checkpoint / close / stats -----------------------------------------------------

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

    async def checkpoint(self) -> None:
        """Install every dirty page, log CHECKPOINT, and truncate the log.

        Steps: note redo LSN = end of log; install dirty pages (forcing the log first);
        flush the device; append and force CHECKPOINT(redo LSN); rewrite the header with
        start LSN = min(redo LSN, first LSN of every live transaction) and flush. Space
        below the new start is reused only after that. Concurrent calls are serialized.
        """
        async with self._ckpt_lock:
            self._ckpt_running = True
            try:
                with trio.CancelScope(shield=True):
                    await self._checkpoint()
            finally:
                self._ckpt_running = False
                self._ckpt_done.set()
                self._ckpt_done = trio.Event()

    async def _checkpoint(self) -> None:
        redo_lsn = self.log.end_lsn
        crash_point("txn.checkpoint.begin")
        await self.cache.install([p for p in self.cache.pages.values() if p.dirty])
        crash_point("txn.checkpoint.installed")
        await self.device.flush()
        crash_point("txn.checkpoint.flushed")
        active = [[t.id, t.first_lsn] for t in self._active.values() if t.first_lsn is not None]
        # The new tail is taken *now*, with the record: a transaction live now may abort
        # while the record is forced, and its CLRs/ABORT (appended after the record, not
        # forced by its abort) may never reach the disk -- recovery must then still find
        # its first updates. Whatever finished before this point has its COMMIT, or its
        # CLRs and ABORT, before the record, made durable by the force below.
        tail = min([redo_lsn] + [first for _, first in active])
        rec = Checkpoint(redo_lsn, self._next_id, active[:64],
                         [[d.gtid, d.commit, d.participants] for d in self._decisions.values()])
        size = _size(_packed_len([rec.active, rec.decisions]))
        if self.log.free() < size:
            return   # no room even for the record: live transactions pin the tail
        lsn, end = self.log.append(rec)
        await self.log.force(end)
        crash_point("txn.checkpoint.logged")
        # a recovery from now on redoes from redo_lsn: blocks logged only before it may
        # take fresh (unlogged) writes
        self._redo_from = redo_lsn
        self._logged = {b: x for b, x in self._logged.items() if x >= redo_lsn}
        await self.log.write_header(start_lsn=tail, ckpt_lsn=lsn)
        crash_point("txn.checkpoint.truncated")
        self._stats["checkpoints"] += 1

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
