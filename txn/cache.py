"""The buffer cache between transactions and the block device.

Pages are whole blocks in memory. A transaction changes a page only right after logging
the change (no await in between), so a page's bytes always correspond to a log prefix.
Installing a page (writing it in place) obeys WAL: the log is forced up to the page's
last LSN first. Pages may be installed with uncommitted bytes ("steal"): recovery undoes
them. Eviction prefers clean pages (LRU); when all are dirty the oldest is installed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Awaitable, Callable

import trio

from replfs.crash import crash_point
from replfs.raid.blockdev import BlockDevice

from .errors import TxnManagerFailed


class Page:
    __slots__ = ("block", "data", "dirty", "lsn", "version", "installing")

    def __init__(self, block: int, data: bytes):
        self.block = block
        self.data = bytearray(data)
        self.dirty = False
        self.lsn = 0          # end LSN of the last record applied to this page
        self.version = 0      # bumped by every change; tells an install it went stale
        self.installing = 0   # installs in flight (eviction and checkpoint may overlap)


class BufferCache:
    """At most about `capacity` pages (a soft bound: dirty pages being installed stay).

    `get` may await (device read, or an eviction that forces the log and writes a page);
    the returned page stays cached until the caller's next await.
    """

    def __init__(self, device: BlockDevice, capacity: int,
                 force_log: Callable[[int], Awaitable[None]]):
        self.device = device
        self.capacity = max(4, capacity)
        self.force_log = force_log
        self.pages: OrderedDict[int, Page] = OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self._install_lock = trio.Lock()
        self.hits = self.misses = self.installs = self.evictions = 0

    def dirty_count(self) -> int:
        return sum(1 for p in self.pages.values() if p.dirty)

    async def get(self, block: int, overwrite: bool = False) -> Page:
        """The page of `block`. `overwrite=True`: the caller replaces all of it before
        its next await, so a page not cached is made without reading the device."""
        while True:
            page = self.pages.get(block)
            if page is not None:
                self.pages.move_to_end(block)
                self.hits += 1
                return page
            ev = self._loading.get(block)
            if ev is not None:
                await ev.wait()
                continue
            # make room *before* loading: nothing may evict the page between here and
            # the caller's use of it.
            if len(self.pages) >= self.capacity:
                if await self._shrink():
                    continue
                # nothing can be installed (the log failed): grow instead of spinning
            if overwrite:
                self.misses += 1
                page = self.pages[block] = Page(block, bytes(self.device.block_size))
                return page
            ev = self._loading[block] = trio.Event()
            try:
                data = await self.device.read_block(block)
            finally:
                del self._loading[block]
                ev.set()
            if block in self.pages:  # cannot happen (loads are exclusive); be safe
                continue
            self.misses += 1
            page = self.pages[block] = Page(block, data)
            return page

    def changed(self, page: Page, lsn_end: int) -> None:
        """Note that `page` now reflects the log up to `lsn_end`."""
        page.dirty = True
        page.lsn = max(page.lsn, lsn_end)
        page.version += 1

    async def _shrink(self) -> bool:
        """Make room for one page; False if impossible (dirty pages, log failed)."""
        for block, page in self.pages.items():
            if not page.dirty and not page.installing:
                del self.pages[block]
                self.evictions += 1
                await trio.lowlevel.checkpoint()
                return True
        victim = next((p for p in self.pages.values() if not p.installing), None)
        if victim is None:   # everything is being installed by others: let them finish
            await trio.sleep(0)
            return True
        try:
            await self.install([victim])
        except TxnManagerFailed:
            return False   # nothing can be installed any more: let the cache grow
        if not victim.dirty and self.pages.get(victim.block) is victim:
            del self.pages[victim.block]
            self.evictions += 1
        return True

    async def rewrite(self, block: int) -> bool:
        """Write the cached page of `block` in place again, dirty or not (WAL first, as
        any install): for a device that lost its copy (a scrub found it beyond repair).
        False if `block` has no page here. A clean page holds what was last installed."""
        page = self.pages.get(block)
        if page is None:
            return False
        await self.install([page], clean_too=True)
        return True

    async def install(self, pages: list[Page], clean_too: bool = False) -> None:
        """Write `pages` in place (WAL first); mark clean those not changed meanwhile.

        Does not flush the device: a checkpoint flushes before it relies on the result.
        A page already being installed by another task is written again (the checkpoint
        must know its own write returned before it flushes). `clean_too`: clean pages
        are written as well (`rewrite`).
        """
        # Installs are serialized: two overlapping installs of one page must land in
        # snapshot order, or an older image could overwrite a newer one.
        async with self._install_lock:
            pages = [p for p in pages if p.dirty or clean_too]
            if not pages:
                return
            snaps = [(p, bytes(p.data), p.version) for p in pages]
            for p in pages:
                p.installing += 1
            try:
                await self.force_log(max(p.lsn for p in pages))
                crash_point("txn.install.before_write")
                await self.device.write_blocks({p.block: data for p, data, _ in snaps})
                crash_point("txn.install.written")
            finally:
                for p in pages:
                    p.installing -= 1
            for p, _, version in snaps:
                if p.version == version:
                    p.dirty = False
            self.installs += len(snaps)
