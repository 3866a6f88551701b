"""Creating and opening a log: `TxnManager.format`, `TxnManager.open` and its recovery.

Recovery (`TxnManager.open`), ARIES-style:

1. *Scan* the log from the header's start LSN to the first invalid record (torn tail),
   then write the header with epoch + 1 so that nothing stale beyond that end can ever
   validate again.
2. *Analysis*: per transaction its updates, its compensated updates (CLRs) and its fate
   (COMMIT, ABORT, PREPARE); the last CHECKPOINT gives the redo LSN, the next
   transaction id and the coordinator decisions.
3. *Redo* (repeat history): apply every UPDATE and CLR from the redo LSN on, winners and
   losers alike, and every REDO batch (committed, outside any transaction), in log order.
4. *Undo*: the losers' (no COMMIT/ABORT/PREPARE) uncompensated updates, newest first
   across all losers, each logged as a CLR before it is applied; then an ABORT per loser.
   A crash during recovery is recovered again: the CLRs already written make the second
   undo skip what the first one did.
5. Prepared transactions stay *in doubt*: their X locks are re-taken from the PREPARE
   record and they wait for `commit()` / `abort()` (`TxnManager.in_doubt()`).
6. A checkpoint installs everything and truncates the log.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from replfs.crash import crash_point
from replfs.raid.blockdev import BlockDevice

from .history import HistoryRecorder
from .log import Log
from .records import Abort, Checkpoint, Clr, Commit, Decision, Forget, Prepare, Redo, Update
from .transaction import ABORT_SIZE, COMMIT_SIZE, Txn, _size, _Upd

if TYPE_CHECKING:
    from .manager import TxnManager


class RecoveryMixin:
    """`TxnManager`'s creation and recovery (the state lives in `TxnManager.__init__`)."""

    # ---- creation and recovery ------------------------------------------------------

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
            if isinstance(rec, Redo):       # committed, outside any transaction
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
            if lsn < redo_lsn:
                continue
            if isinstance(rec, (Update, Clr)):
                page = await self.cache.get(rec.block)
                page.data[rec.offset:rec.offset + len(rec.new)] = rec.new
                self.cache.changed(page, end)
                redone += 1
            elif isinstance(rec, Redo):
                for block, offset, data in rec.changes:
                    page = await self.cache.get(block)
                    page.data[offset:offset + len(data)] = data
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
