"""Ordered mode: whole fresh blocks written in place, unlogged (`Txn.write_fresh`).

A block nobody can see the old contents of (freshly allocated) need not be logged: its
bytes go to the device before the transaction's COMMIT (or PREPARE) record is appended,
so a crash leaves either the committed transaction with its data or a block still free.
This is safe only where recovery would not redo older records of the block over the new
bytes: the manager tracks the LSN a recovery now would redo from (`_redo_from`, set by
each checkpoint) and the last UPDATE/CLR LSN of each block logged since (`_logged`,
kept by `_write`, `_undo` and pruned by `_checkpoint`); elsewhere the write falls back
to a logged `write(undo=False)`.

A large transaction of a replicating primary writes its fresh blocks after its COMMIT
was appended and published, with the log held back below the COMMIT until they are in
place (`TxnManager._commit`, `Log.hold`): the same order on this device, while the
backup already receives the commit.
"""

from __future__ import annotations

import trio

from replfs.crash import crash_point

from .history import BlockRange
from .transaction import Txn


class OrderedMixin:
    """`TxnManager`'s fresh (unlogged) writes (the state lives in `TxnManager.__init__`)."""

    def _fresh_allowed(self, block: int) -> bool:
        """May `block` be written in place, unlogged? Not if recovery would redo older
        records of it over the new bytes (no checkpoint yet, or logged since the last)."""
        return self._redo_from is not None and self._logged.get(block, -1) < self._redo_from

    async def _write_fresh(self, txn: Txn, block: int, data: bytes) -> None:
        self._check_block(block)
        if len(data) != self.device.block_size:
            raise ValueError(f"a fresh write is a whole block, not {len(data)} bytes")
        if not self._fresh_allowed(block):
            # recovery would redo older records of this block over the new bytes
            self._stats["fresh_logged"] += 1
            await self._write(txn, block, 0, data, False)
            return
        txn.fresh[block] = data
        if self.history is not None:
            self.history.write(txn.id, BlockRange(block, 0, len(data)))

    async def _write_fresh_blocks(self, txn: Txn, threaded: bool = False) -> None:
        """Before the COMMIT (or PREPARE) record is written: the transaction's fresh
        blocks in place (`threaded`: in a worker thread, through the device's
        `write_sync`, while the event loop goes on); a cached page of one (left from its
        previous life) takes the new bytes."""
        await self._write_in_place(txn.fresh, threaded)
        crash_point("txn.commit.fresh_written")

    async def _write_in_place(self, fresh: dict[int, bytes], threaded: bool = False) -> None:
        """Write whole blocks `fresh` to the device, unlogged; a cached page of one (left
        from its previous life) takes the new bytes."""
        if threaded:
            await trio.to_thread.run_sync(self.device.write_sync, fresh)
        else:
            await self.device.write_blocks(fresh)
        for block, data in fresh.items():
            page = self.cache.pages.get(block)
            if page is not None:
                page.data[:] = data
                page.version += 1
        self._stats["fresh_blocks"] += len(fresh)
