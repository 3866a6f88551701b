"""A block device over another that repairs, from elsewhere, blocks it cannot read.

The array raises `BlockIOError` for a logical block that its checksums reject and its
parity cannot rebuild (two damaged members of one stripe). `HealingDevice` wraps any
`BlockDevice`: on such an error it asks `heal(block)` -- a callback the layer above
supplies (the replication server fetches the block from the other replica of its group)
-- for the block's right bytes, writes them back through the inner device (so the
array's checksums and parity are right again) and returns them. Only a block that
`heal` cannot supply (None) raises `BlockIOError` to the caller, never wrong bytes.

raid/ knows nothing of where the bytes come from: `heal` is a plain async callback, and
it decides which blocks may be healed at all (it must return None for a block whose
right contents only this device holds).
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Mapping

from .blockdev import BlockIOError, check_range

log = logging.getLogger("replfs.raid.heal")

Heal = Callable[[int], Awaitable["bytes | None"]]


class HealingDevice:
    """`inner`'s blocks; unreadable ones are fetched with `heal` and rewritten.

    Counters: `healed` (blocks rewritten from `heal`), `unhealed` (blocks that stayed
    unreadable: EIO to the caller), and `lost`, the last few such block numbers."""

    LOST_KEPT = 64

    def __init__(self, inner, heal: Heal | None = None):
        self.inner = inner
        self.heal = heal
        self.block_size = inner.block_size
        self.nblocks = inner.nblocks
        self.healed = 0
        self.unhealed = 0
        self.lost: list[int] = []

    def __getattr__(self, name):        # close(), status(), ... of the inner device
        return getattr(self.inner, name)

    async def read_block(self, n: int) -> bytes:
        return await self.read_blocks(n, 1)

    async def read_blocks(self, start: int, count: int) -> bytes:
        check_range(self, start, count)
        try:
            return await self.inner.read_blocks(start, count)
        except BlockIOError:
            if self.heal is None:
                raise
        # one block at a time: heal exactly the ones that fail
        out = []
        for n in range(start, start + count):
            out.append(await self._read_one(n))
        return b"".join(out)

    async def _read_one(self, n: int) -> bytes:
        try:
            return await self.inner.read_blocks(n, 1)
        except BlockIOError as exc:
            first = exc
        data = await self.heal(n)
        if data is None or len(data) != self.block_size:
            self.lose(n)
            raise first
        try:
            await self.inner.write_blocks({n: bytes(data)})
        except BlockIOError as exc:
            # the bytes are right (the partner verified them); the array could not
            # take them back (e.g. too many disks gone): answer, but say so
            log.error("block %d: healed from the other replica but not rewritten: %s", n, exc)
            self.healed += 1
            return bytes(data)
        self.healed += 1
        log.warning("block %d: unreadable here (%s); healed from the other replica",
                    n, first.reason)
        return bytes(data)

    def lose(self, n: int) -> None:
        """Count `n` unreadable, and keep it among the last few lost blocks."""
        self.unhealed += 1
        if n not in self.lost:
            self.lost.append(n)
            del self.lost[:-self.LOST_KEPT]

    async def write_blocks(self, blocks: Mapping[int, bytes]) -> None:
        await self.inner.write_blocks(blocks)
        self.forget(blocks)

    def write_sync(self, blocks: Mapping[int, bytes]) -> None:
        """`write_blocks` for a worker thread (the inner device must have `write_sync`)."""
        self.inner.write_sync(blocks)
        self.forget(blocks)

    def forget(self, blocks) -> None:
        """No longer list these blocks as lost (rewritten, or holding nothing now)."""
        if self.lost:
            self.lost = [n for n in self.lost if n not in blocks]

    async def flush(self) -> None:
        await self.inner.flush()
