"""`Op`: the context of one attempt of one filesystem operation (one transaction).

It wraps the transaction with the filesystem's vocabulary: lock-and-read an inode, write
it back, allocate and free blocks and inodes. It remembers what it allocated and freed so
that the in-memory allocation maps follow the transaction's fate (see alloc.py).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from replfs.fs.errors import ForeignInode, FsError
from replfs.fs.layout import (BLOCK_SIZE, INODE_SIZE, INODES_PER_BLOCK, Inode, ino_group,
                              ino_slot, make_ino)

if TYPE_CHECKING:
    from replfs.fs.core import FileSystem


class Op:
    def __init__(self, fs: "FileSystem", txn):
        self.fs = fs
        self.txn = txn
        self.sb = fs.sb
        txn.on_commit.append(self._cache_committed)
        self._inodes: dict[int, Inode] = {}
        self._modes: dict[int, str] = {}
        self._written: set[int] = set()
        self.alloc_blocks: list[int] = []
        self.freed_blocks: list[int] = []
        self.alloc_inodes: list[int] = []
        self.freed_inodes: list[int] = []
        self.held_inodes: list[int] = []    # freed, but their numbers not reused yet
        self.lock_timeout: float | None = None     # None: the lock table's default

    # ------------------------------------------------------------ inodes
    def _slot(self, ino: int) -> int:
        slot = ino_slot(ino)
        if ino_group(ino) != self.sb.group:
            raise ForeignInode(ino)
        if not 0 < slot < self.sb.ninodes:
            raise FsError(errno.ENOENT, f"inode {ino} is not in this group")
        return slot

    def _where(self, slot: int) -> tuple[int, int]:
        return (self.sb.itable_start + slot // INODES_PER_BLOCK,
                (slot % INODES_PER_BLOCK) * INODE_SIZE)

    async def lock(self, key, mode: str) -> None:
        held = self._modes.get(key)
        if held == "X" or held == mode:
            return
        await self.txn.lock(key, mode, self.lock_timeout)
        self._modes[key] = mode

    async def inode(self, ino: int, mode: str = "S", *, must_exist: bool = True) -> Inode:
        """Lock inode `ino` (S or X, strict 2PL) and return it (this op's private copy)."""
        slot = self._slot(ino)
        await self.lock(("inode", ino), mode)
        node = self._inodes.get(ino)
        if node is None:
            blk, off = self._where(slot)
            node = Inode.unpack(await self.txn.read(blk, off, INODE_SIZE))
            self._inodes[ino] = node
        if must_exist and node.nlink == 0 and node.mode == 0:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        return node

    async def put(self, ino: int, node: Inode) -> None:
        """Write `node` back (the caller holds X on it)."""
        blk, off = self._where(self._slot(ino))
        self._inodes[ino] = node
        self._written.add(ino)
        await self.txn.write(blk, off, node.pack())

    async def new_inode(self, node: Inode, near: int | None = None) -> int:
        slot = await self.fs.imap.allocate(self.txn, None if near is None else ino_slot(near))
        self.alloc_inodes.append(slot)
        ino = make_ino(self.sb.group, slot)
        await self.lock(("inode", ino), "X")
        node.generation = self.fs.next_generation()
        await self.put(ino, node)
        return ino

    async def free_inode(self, ino: int, hold: bool = False) -> None:
        """Free `ino`. With `hold` its number is not handed out again until
        `FileSystem.release_number(ino)` (the kernel may still know it by that number)."""
        slot = self._slot(ino)
        await self.fs.imap.free(self.txn, slot)
        (self.held_inodes if hold else self.freed_inodes).append(slot)
        await self.put(ino, Inode())

    # ------------------------------------------------------------ blocks
    async def new_block(self, near: int | None = None, zero: bool = True) -> int:
        n = await self.fs.bmap.allocate(self.txn, near)
        self.alloc_blocks.append(n)
        if zero:
            await self.txn.write(n, 0, bytes(BLOCK_SIZE), undo=False)
        return n

    async def new_blocks(self, count: int, near: int | None = None) -> list[int]:
        """`count` data blocks, contiguous where possible, NOT zeroed (the caller writes
        them whole)."""
        blocks = await self.fs.bmap.allocate_run(self.txn, count, near)
        self.alloc_blocks.extend(blocks)
        return blocks

    async def free_block(self, n: int) -> None:
        await self.fs.bmap.free(self.txn, n)
        self.freed_blocks.append(n)

    async def free_blocks(self, ns: list[int]) -> None:
        await self.fs.bmap.free_many(self.txn, ns)
        self.freed_blocks.extend(ns)

    async def write_fresh(self, n: int, data: bytes) -> None:
        """All of block `n`, freshly allocated by this operation: in place before the
        commit (Txn.write_fresh) unless its freeing is not settled (FileSystem.fresh_ok)."""
        if self.fs.fresh_ok(n):
            await self.txn.write_fresh(n, data)
        else:
            await self.txn.write(n, 0, data, undo=False)

    async def read_block(self, n: int) -> bytes:
        return await self.txn.read(n)

    async def write_block(self, n: int, offset: int, data: bytes, undo: bool = True) -> None:
        await self.txn.write(n, offset, data, undo=undo)

    # ------------------------------------------------------------ fate
    def aborted(self) -> None:
        self.fs.bmap.rollback_allocated(self.alloc_blocks)
        self.fs.imap.rollback_allocated(self.alloc_inodes)

    def uncache_written(self) -> None:
        """Forget the cached committed state of the inodes this operation wrote (it is
        prepared, and holds them X-locked: nobody can cache them again before its end)."""
        self.fs.uncache_committed(self._written)

    def _cache_committed(self) -> None:
        # under the transaction's locks still: caches follow the commit order
        self.fs.inodes_committed({ino: self._inodes[ino] for ino in self._written})
        self.fs.numbers_held(make_ino(self.sb.group, slot) for slot in self.held_inodes)

    def committed(self) -> None:
        rec = self.txn.commit_record
        if self.freed_blocks and rec is not None and rec.lsn is not None:
            self.fs.blocks_freed(rec.lsn, self.freed_blocks)
        self.fs.bmap.commit_freed(self.freed_blocks)
        self.fs.imap.commit_freed(self.freed_inodes)
