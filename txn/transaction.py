"""The transaction handle and the values it produces: `Txn`, `CommitRecord`, `Change`.

A `Txn` is a thin handle: each method checks the transaction's state and hands the work
to its `TxnManager` (`manager`; 2PC prepare in `twophase`, ordered-mode fresh writes in
`ordered`). `CommitRecord` and `Change` are what subscribers receive (`publish`). The
log-size helpers here (`_size`, `ABORT_SIZE`, `COMMIT_SIZE`) are the space every module
reserves before it appends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, NamedTuple

import msgpack

from .errors import TxnAborted
from .records import FRAME_SIZE, RECORD_OVERHEAD

if TYPE_CHECKING:
    from .manager import TxnManager

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

    async def commit(self, payload: Any = None, *, durable: bool = True,
                     release_early: bool = False) -> CommitRecord:
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
        without everything that committed after it (the log is one sequence).

        `release_early` (with `durable`): the locks go, and the commit is visible, as
        soon as the COMMIT is appended; the call still returns only once it is durable
        (early lock release: whoever reads it logs after the COMMIT, so nothing that
        depends on it can be durable without it). For a 2PC participant's or
        coordinator's commit, whose force would otherwise hold the locks."""
        self._check_usable("active", "prepared")
        return await self.mgr._commit(self, payload, durable=durable,
                                      release_early=release_early)

    async def abort(self) -> None:
        """Undo this transaction's updates (logging CLRs), log ABORT, release the locks.

        Idempotent; never raises for contention; shielded from cancellation."""
        await self.mgr._abort(self)
