"""Replication hooks: the commit stream (`subscribe`) and applying a primary's changes
(`apply`).

Subscribers receive every `CommitRecord` (and the 2PC prepare/abort events, see
`CommitRecord`) in LSN order, once the log is durable up to it -- or as soon as it is
appended with `publish_at_append` (a replicating primary: its backup holds a record
before the primary's own disk does). A subscriber whose bounded buffer is full, or who
closed its end, is dropped. `apply` is the backup side: a primary's changes as one
local transaction.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import trio

from .transaction import Change, CommitRecord, FreshChange, Txn


class PublishMixin:
    """`TxnManager`'s subscribers and `apply` (the state lives in `TxnManager.__init__`)."""

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

    def _queue_publish(self, end: int, rec: CommitRecord) -> None:
        """Subscribers get `rec` once the log is durable up to `end` -- or at once, in
        append (LSN) order, with `publish_at_append` (a replicating primary: its backup
        holds a record before the primary's own disk does). `on_append` sees it first,
        before any await: no log write can carry the record before it returned."""
        if self.on_append is not None:
            self.on_append(rec)
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
