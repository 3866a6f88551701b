"""Log space: reservations, the per-transaction limit, and checkpoints.

Every append is preceded by a reservation (`_reserve`) of its framed size; a
transaction also keeps a reserve for its CLRs, ABORT and COMMIT, so that it can always
finish. When the log is too full to promise the space, the reserving task takes a
checkpoint: it installs every dirty page, logs CHECKPOINT (redo LSN, next transaction
id, live transactions, coordinator decisions) and truncates the log up to the oldest
of the redo LSN and the live transactions' first records (recovery step 6, see
`recovery`). A commit that leaves the log fuller than `checkpoint_at` takes one too.
"""

from __future__ import annotations

import trio

from replfs.crash import crash_point

from .errors import LogFull, TxnTooLarge
from .records import Checkpoint
from .transaction import _packed_len, _size


class CheckpointMixin:
    """`TxnManager`'s log-space reservations and checkpoints (the state lives in
    `TxnManager.__init__`)."""

    @property
    def max_txn_bytes(self) -> int:
        """The most log one transaction may use (UPDATE records with their undo reserve:
        about 3x the bytes written with undo, 1x with undo=False, plus ~100 bytes per
        write). Beyond it `TxnTooLarge` is raised."""
        return self.log.usable - 2 * self._ckpt_margin

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
