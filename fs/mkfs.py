"""Making a filesystem on a block device, and opening one.

`mkfs` lays out the superblock, allocation maps, inode table and log (txn/), then creates
the root and the orphan directory in a first transaction. `open_fs` reads the superblock,
opens the transaction manager (which recovers the log), loads the allocation maps and
reclaims orphans left by a crash.
"""

from __future__ import annotations

import stat
import time

from replfs.fs import directory
from replfs.fs.alloc import ByteMap
from replfs.fs.core import FileSystem
from replfs.fs.errors import FormatError
from replfs.fs.layout import (BLOCK_SIZE, FIRST_FREE_SLOT, ORPHAN_SLOT, ROOT_SLOT, Inode,
                              Superblock, make_ino)
from replfs.fs.op import Op
from replfs.txn import TxnManager

ZERO_BATCH = 256


async def _zero(device, start: int, count: int) -> None:
    zero = bytes(BLOCK_SIZE)
    for s in range(start, start + count, ZERO_BATCH):
        n = min(ZERO_BATCH, start + count - s)
        await device.write_blocks({b: zero for b in range(s, s + n)})


async def _write_map(device, start: int, nblocks: int, used_below: int) -> None:
    """A byte map over `nblocks * BLOCK_SIZE` objects with objects < used_below in use."""
    for i in range(nblocks):
        lo = i * BLOCK_SIZE
        n_used = max(0, min(BLOCK_SIZE, used_below - lo))
        await device.write_blocks({start + i: b"\1" * n_used + bytes(BLOCK_SIZE - n_used)})


async def mkfs(device, *, group: int = 0, uid: int = 0, gid: int = 0, root_mode: int = 0o755,
               log_blocks: int | None = None, inodes: int | None = None) -> Superblock:
    """Make an empty filesystem on `device` (everything on it is lost)."""
    if device.block_size != BLOCK_SIZE:
        raise FormatError(f"the device has {device.block_size}-byte blocks; replfs needs {BLOCK_SIZE}")
    sb = Superblock.plan(device.nblocks, group, log_blocks=log_blocks, inodes=inodes)
    await _write_map(device, sb.bmap_start, sb.bmap_blocks, sb.data_start)
    # blocks past the end of the device are never free
    tail = sb.bmap_blocks * BLOCK_SIZE - sb.nblocks
    if tail:
        last = sb.bmap_start + sb.bmap_blocks - 1
        data = bytearray(await device.read_block(last))
        data[BLOCK_SIZE - tail:] = b"\1" * tail
        await device.write_blocks({last: bytes(data)})
    await _write_map(device, sb.imap_start, sb.imap_blocks, FIRST_FREE_SLOT)
    await _zero(device, sb.itable_start, sb.itable_blocks)
    await TxnManager.format(device, log_start=sb.log_start, log_blocks=sb.log_blocks)
    await device.write_blocks({0: sb.pack()})
    await device.flush()

    fs = await open_fs(device, _creating=True)
    try:
        async def make_dirs(txn):
            op = Op(fs, txn)
            ops.append(op)
            for slot, mode in ((ROOT_SLOT, root_mode), (ORPHAN_SLOT, 0o700)):
                ino = make_ino(group, slot)
                await op.lock(("inode", ino), "X")
                node = Inode(mode=stat.S_IFDIR | mode, uid=uid, gid=gid, nlink=2,
                             generation=fs.next_generation(), parent=make_ino(group, ROOT_SLOT))
                node.atime_ns = node.mtime_ns = node.ctime_ns = time.time_ns()
                await directory.init(op, node)
                await op.put(ino, node)
        ops: list[Op] = []
        await fs.mgr.run(make_dirs, name="mkfs")
        ops[-1].committed()
    finally:
        await fs.close()
    return sb


async def open_fs(device, *, history=None, lock_timeout: float = 10.0,
                  cache_blocks: int = 16384, reclaim: bool = True,
                  _creating: bool = False) -> FileSystem:
    """Open the filesystem on `device`: recover the log, load the maps, reclaim orphans.
    Raises FormatError (a ReplfsError with what to do) if there is none."""
    sb = Superblock.unpack(await device.read_block(0))
    if sb.nblocks > device.nblocks:
        raise FormatError(f"the filesystem needs {sb.nblocks} blocks but the device has "
                          f"{device.nblocks}: wrong array?")
    mgr = await TxnManager.open(device, log_start=sb.log_start, log_blocks=sb.log_blocks,
                                cache_blocks=cache_blocks, history=history,
                                lock_timeout=lock_timeout)
    maps = {}

    async def load(txn):
        for name, start, nblk, count in (("blocks", sb.bmap_start, sb.bmap_blocks, sb.nblocks),
                                        ("inodes", sb.imap_start, sb.imap_blocks, sb.ninodes)):
            img = bytearray()
            for i in range(nblk):
                img += await txn.read(start + i)
            maps[name] = img[:count]
    await mgr.run(load, name="load-maps")
    fs = FileSystem(sb, mgr, ByteMap("blocks", sb.bmap_start, sb.nblocks, sb.data_start, maps["blocks"]),
                    ByteMap("inodes", sb.imap_start, sb.ninodes, FIRST_FREE_SLOT, maps["inodes"]))
    # reclaim=False: clients may still hold orphans (replication); prepared transactions
    # in doubt hold their locks until their coordinator decides: reclaim next time
    if reclaim and not _creating and not mgr.in_doubt():
        fs.orphans_reclaimed = await fs.reclaim_orphans()
    return fs
