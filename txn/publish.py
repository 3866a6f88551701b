"""Replication hooks: the commit stream (`subscribe`) and applying a primary's changes
(`apply`, and `apply_redo`, its cheap form for a backup).

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

from .records import Redo
from .transaction import Change, CommitRecord, FreshChange, Txn, _size

REDO_ENTRY = 24     # msgpack bytes of one REDO entry besides its data, at most


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

    async def apply_redo(self, changes: Iterable[tuple]) -> int:
        """Apply a primary's committed changes ``(block, offset, data[, fresh])`` as one
        REDO record, outside any transaction: committed once the record is written
        (lazily: it is forced with the next force); returns its LSN.

        The cheap form of `apply(durable=False, undo=False)` for a backup, which applies
        its primary's commits one batch at a time in commit order under its own lock:
        no transaction, no locks, one record for the whole batch, whole or absent after
        a crash (its frame's checksum). A fresh change (a whole new block) goes in place
        before the record is appended (ordered mode), unless recovery would redo older
        records of its block over it: then it is logged like the rest."""
        bs = self.device.block_size
        fresh: dict[int, bytes] = {}
        logged: list[list] = []
        for c in changes:
            block, offset, data = c[0], c[1], bytes(c[2])
            self._check_block(block)
            if offset < 0 or offset + len(data) > bs:
                raise ValueError(f"range {offset}+{len(data)} outside a {bs}-byte block")
            if (len(c) > 3 and c[3] and offset == 0 and len(data) == bs
                    and self._fresh_allowed(block)):
                fresh[block] = data
            else:
                logged.append([block, offset, data])
        if fresh:
            await self._write_in_place(fresh)
        size = _size(sum(len(d) for _, _, d in logged) + REDO_ENTRY * len(logged))
        await self._reserve(size)
        try:
            # every page at hand before the record is appended, then the record and the
            # changes in one step (no await): a checkpoint can never fall between them
            while True:
                pages = [await self.cache.get(b, overwrite=(o == 0 and len(d) == bs))
                         for b, o, d in logged]
                if all(self.cache.pages.get(e[0]) is p for e, p in zip(logged, pages)):
                    break
        except BaseException:
            self.log.reserved -= size
            raise
        lsn, end = self.log.append(Redo(logged), reserved=size)
        for (block, offset, data), page in zip(logged, pages):
            page.data[offset:offset + len(data)] = data
            self.cache.changed(page, end)
            self._logged[block] = lsn
        self._stats["commits"] += 1
        self._stats["lazy_commits"] += 1
        if self.log.used > self.checkpoint_at * self.log.usable and not self._ckpt_running:
            await self.checkpoint()
        return lsn

    def subscribe(self, max_buffer: float = math.inf) -> trio.MemoryReceiveChannel:
        """A channel receiving every `CommitRecord`, in commit order, once it is durable
        (or once it is appended: `publish_at_append`).

        A subscriber whose bounded buffer is full, or who closed its end, is dropped."""
        send, recv = trio.open_memory_channel(max_buffer)
        self.subscribe_into(send)
        return recv

    def subscribe_into(self, send: trio.MemorySendChannel) -> None:
        """Publish into the caller's channel, which may carry the caller's own items
        too, in their place among the records (dropped when full or closed)."""
        self._subscribers.append(send)

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
