"""Two-phase commit state: the participant's PREPARE and in-doubt transactions, the
coordinator's logged decisions.

A participant votes YES with `Txn.prepare`: PREPARE (payload + X-locked keys) is logged
and forced, and the transaction may then only `commit()` or `abort()`, both forced
(the coordinator may forget its decision once it is answered). A prepared transaction
survives a crash *in doubt*: recovery re-takes its X locks from the PREPARE record and
leaves it prepared (`in_doubt()`), unless its abort had begun (it has CLRs), which
recovery finishes. A coordinator logs and forces DECISION (`log_decision`) and keeps it,
across checkpoints, until every participant has acknowledged (`forget_decision`).
"""

from __future__ import annotations

from typing import Any, Hashable

import trio

from replfs.crash import crash_point

from .records import Decision, Forget, Prepare
from .transaction import (ABORT_SIZE, COMMIT_SIZE, CommitRecord, Txn, _changes, _packed_len,
                          _size)


class TwoPhaseMixin:
    """`TxnManager`'s 2PC participant and coordinator state (the state lives in
    `TxnManager.__init__`)."""

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
