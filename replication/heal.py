"""Healing from the other replica (issue 13, point 3).

A logical block that a server's own array cannot read -- its checksum fails and parity
cannot rebuild it (two damaged disks of one stripe) -- is fetched from the partner in the
group, rewritten locally through the array (checksums and parity right again), counted
(`stats["healed_blocks"]`), and returned. Only when no replica holds a good copy does
the caller get EIO (`stats["unhealed_reads"]`, and `lost_blocks` in the status).

The mechanism: the server's filesystem runs over `raid.healing.HealingDevice(array,
self._heal)`; the buffer cache's device read is where an unreadable block surfaces, and
the device asks `_heal`. `_heal` asks the partner with `HealRequest` on a fresh
authenticated connection; the partner answers `HealReply` from its own state.

Which copy is right. Today only the primary asks (it alone serves reads), its backup
answers. The primary reads a block from its array only when its buffer cache has no
page of it, so its array holds the block's newest bytes on the primary: every change
made to it was installed before the page left the cache. Those bytes are the committed
state of the block unless
- a live transaction (active, or prepared for 2PC) changed it: stolen uncommitted bytes
  or a fresh block written before its commit. Nobody else has those bytes:
  `TxnManager.unsettled(block)` -> no heal, EIO (the transaction can be retried);
- a commit that changed it has not reached the backup yet. The primary waits until the
  backup acknowledged every commit published so far (`acked_lsn >= committed_lsn`);
  an acknowledged batch is applied and written on the backup (backup.py `_hold`).
While the load is in flight no transaction can change the block (loads are exclusive
in the buffer cache), so the primary's state of it does not move meanwhile.
The backup applies exactly the primary's committed changes, batch by batch under its
`apply_lock`; between batches its copy of a block is the committed one as of the last
batch applied -- its buffer cache page if it has one (a page applied but not yet
installed is newer than its disk), else its array (an evicted page was installed
first). So the backup answers under `apply_lock`, from its cache page or, failing that,
from a checksum-verified read of its raw array (never healing in turn).
Blocks that are the replica's own are never healed: the log region and the
replication-position block. A backup does not ask its primary (yet): the primary's
copy may be newer than the batch the backup is applying, and it has no older one.

Scrub (`_scrub_heal`, the array jobs' `heal`): the online scrub lists the blocks it found
beyond repair; each is healed the way a read is. A block with a page in this replica's
buffer cache is written back from that page (`BufferCache.rewrite`: the page is at least
as new as the array, WAL first). Otherwise the primary loads it into its buffer cache
(`cache.get`): the load is exclusive, goes through `HealingDevice` and so `_heal`, and
rewrites the block -- the same path and the same counters as a read. A backup has no one
to ask (see above): its lost blocks are noted (`lost_blocks`) and stay lost until the
next state transfer, or a scrub after it becomes primary.
"""

from __future__ import annotations

import logging

import trio

from replfs.fs.owners import block_owners
from replfs.raid.blockdev import BlockIOError
from replfs.replication import amo, wire
from replfs.replication.lostnames import complete_path

log = logging.getLogger("replfs.heal")

HEAL_TIMEOUT = 5.0
PATHS_TIMEOUT = 10.0        # seconds spent asking other groups for paths' beginnings
OWNERS_WAIT = 1.0           # seconds a status request waits for the files of lost blocks


class HealRole:
    """Part of `ReplicaServer`: `_heal` (asker) and `_on_heal_request` (partner)."""

    def _healable(self, block: int) -> bool:
        """A block every replica of the group holds alike (what a state transfer sends)."""
        fs = self.fs
        if fs is None:
            return False
        sb = fs.sb
        if sb.log_start <= block < sb.log_start + sb.log_blocks:
            return False
        return block < sb.nblocks or block in amo.replicated_tail(self.array.nblocks)

    async def _heal(self, block: int) -> bytes | None:
        data, why = await self._heal_from_partner(block)
        if data is None:
            self.stats["unhealed_reads"] += 1
            log.error("block %d: unreadable here and not healed: %s", block, why)
        else:
            self.stats["healed_blocks"] += 1
        return data

    async def lost_files(self) -> dict:
        """The files that own the lost blocks (`lost_blocks` of the status): found when
        asked, with fsck's scan (fs/owners.py), in the background, and kept until the
        set changes. A scan not done within OWNERS_WAIT (status callers wait about 2 s)
        answers that it is under way; the next status request gets the files."""
        fs = self.fs
        if fs is not None and self.role == "primary":
            # a block its file gave back (removed, truncated) holds nothing any more; it
            # is written whole before it holds anything again (a backup's maps are stale)
            sb, used = fs.sb, fs.bmap.mem
            self.device.forget([b for b in self.device.lost
                                if sb.data_start <= b < sb.nblocks and not used[b]])
        key = tuple(sorted(self.device.lost))
        cur = self._lost_files
        if cur is None or cur[0] != key or (cur[1] or {}).get("error"):   # errors: again
            if self.fs is None or self._nursery is None:
                return dict(error="the filesystem is not open")
            self._lost_files = (key, None)
            done = trio.Event()
            self._nursery.start_soon(self._find_lost_files, key, done)
            with trio.move_on_after(OWNERS_WAIT):
                await done.wait()
        found = self._lost_files[1] if self._lost_files[0] == key else None
        return found or dict(error="the files are being looked for; ask again")

    async def _find_lost_files(self, key: tuple, done: trio.Event) -> None:
        try:
            if self.role == "primary":
                found = await block_owners(self.fs, key)
            else:       # a backup's pages change only under the apply lock
                async with self.apply_lock:
                    found = await block_owners(self.fs, key)
            await self._complete_paths(found["files"])
        except Exception as exc:        # status must never take the server down
            log.error("naming the files of lost blocks failed: %r", exc)
            found = dict(error=f"the files could not be found: {exc}")
        if self._lost_files is not None and self._lost_files[0] == key:
            self._lost_files = (key, found)
        done.set()

    async def _complete_paths(self, files: list[dict]) -> None:
        """Paths that stop where another group keeps the names: ask that group."""
        peer = self.twopc.peer
        with trio.move_on_after(PATHS_TIMEOUT):
            for f in files:
                if f["from_dir"] is None or not f["from_parent"] or peer is None:
                    continue
                try:
                    path = await complete_path(peer, f["path"], f["from_dir"], f["from_parent"])
                except Exception as exc:    # a partial path is still an answer
                    log.info("the path of inode %s stays partial: %s", f["inode"], exc)
                    continue
                if path is not None:
                    f.update(path=path, from_dir=None, from_parent=None)

    async def _scrub_heal(self, block: int) -> bool:
        """Heal a block the scrub found beyond repair; False if it stays lost."""
        fs = self.fs
        if fs is None or not self._healable(block):
            # not a filesystem block (the log's own, or beyond it): nothing to heal it from
            self.device.lose(block)
            return False
        cache = fs.mgr.cache
        if block in cache.pages:
            async with self.apply_lock:      # a backup's pages change under it only
                if await cache.rewrite(block):
                    self.stats["healed_blocks"] += 1
                    return True
        if self.role != "primary":
            self.device.lose(block)
            return False
        try:
            await cache.get(block)
        except BlockIOError:
            return False
        return True

    async def _heal_from_partner(self, block: int) -> tuple[bytes | None, str]:
        p = self.primary
        v = self.view
        if self.role != "primary" or p is None:
            return None, f"{self.name} is {self.role}: only a primary heals"
        if not v.backup or not p.backup_synced:
            return None, "no synchronized backup holds a copy"
        if not self._healable(block):
            return None, "the block is this replica's own (log or position)"
        if self.fs.mgr.unsettled(block):
            return None, "a live transaction changed the block"
        target = p.committed_lsn
        try:
            r = await self._ask_backup(p, v, block, target)
        except wire.CONN_ERRORS as exc:
            return None, f"the backup {v.backup} could not be asked: {exc!r}"
        if r is None:
            return None, f"the backup {v.backup} did not answer within {HEAL_TIMEOUT} s"
        if isinstance(r, str):
            return None, r
        if not isinstance(r, wire.HealReply) or r.block != block:
            return None, f"the backup answered {getattr(r, 'TAG', r)!r}"
        if r.data is None:
            return None, f"the backup {v.backup} has no good copy: {r.reason}"
        if not isinstance(r.data, bytes) or len(r.data) != self.array.block_size:
            return None, "the backup sent a malformed block"
        return r.data, ""

    async def _ask_backup(self, p, v, block: int, target: int):
        with trio.move_on_after(HEAL_TIMEOUT):
            while p.acked_lsn < target and self.primary is p:
                await self._changed.wait()
            if self.primary is not p or self.view.num != v.num:
                return "the view changed"
            ch = await wire.connect(self.cfg.addr(self.name, v.backup), self.secret, self.name)
            try:
                await ch.send(wire.HealRequest(v.num, self.name, block))
                r = await ch.receive()
            finally:
                await ch.aclose()
            return r
        return None

    async def _on_heal_request(self, ch: wire.Channel, msg: wire.HealRequest) -> None:
        if not (isinstance(msg.view, int) and isinstance(msg.primary, str)
                and isinstance(msg.block, int)):
            raise wire.ProtocolError("malformed heal?")
        data, reason = None, ""
        if self.role != "backup" or msg.view != self.view.num or msg.primary != self.view.primary:
            reason = f"{self.name} is {self.role} in view {self.view.num}, not {msg.primary}'s backup"
        elif not self._healable(msg.block):
            reason = "not a replicated block"
        else:
            async with self.apply_lock:
                page = self.fs.mgr.cache.pages.get(msg.block)
                if page is not None:
                    data = bytes(page.data)
                else:
                    try:
                        data = await self.array.read_blocks(msg.block, 1)
                    except BlockIOError as exc:
                        reason = str(exc)
        if data is not None:
            self.stats["heals_served"] += 1
        await ch.send(wire.HealReply(msg.block, data, reason))
