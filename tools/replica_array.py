"""A server's array and filesystem on its own machine: made for `replfs init`
(`make_server_array`), opened for `replfs server` (`open_replica_array`, which brings a
replica back from the RAID-5 write hole), and made anew (`make_filesystem`)."""

from __future__ import annotations

import logging

import trio

from replfs.raid import WriteHole, open_array
from replfs.replication import needscopy
from replfs.replication.config import ClusterConfig

log = logging.getLogger("replfs.cluster")


async def make_server_array(cfg: ClusterConfig, server: str, progress=print) -> None:
    """Make server `server`'s array (the description's disks and size) in its data
    directory, with an empty filesystem of its group (`make_filesystem`)."""
    from replfs.raid import create_array

    group = cfg.group_of(server)
    array = create_array(cfg.server_dir(server), cfg.disks, cfg.disk_size)
    try:
        sb = await make_filesystem(array, group)
    finally:
        array.close()
    progress(f"replfs: {server} (group {group}): {cfg.disks}-disk RAID-5 array in "
             f"{cfg.server_dir(server)}, filesystem of {sb.nblocks * 4096 // 2**20} MiB")


async def make_filesystem(array, group: int):
    """A new, empty filesystem of `group` on a replica's array, leaving the replicated
    tail outside it, and that tail cleared (no position, no replies, no decisions): what
    a new replica holds before its partner's first full copy. Returns its superblock."""
    from replfs.fs.mkfs import mkfs
    from replfs.replication import amo
    first = array.nblocks - amo.TAIL_BLOCKS
    sb = await mkfs(_Shorter(array, first), group=group)
    await array.write_blocks({b: bytes(array.block_size)
                              for b in range(first, array.nblocks)})
    await array.flush()
    return sb


class _Shorter:
    """The first `nblocks` blocks of a device (mkfs leaves the rest alone)."""

    def __init__(self, device, nblocks: int):
        self.device = device
        self.block_size = device.block_size
        self.nblocks = nblocks

    async def read_block(self, n):
        return await self.device.read_block(n)

    async def read_blocks(self, start, count):
        return await self.device.read_blocks(start, count)

    async def write_blocks(self, blocks):
        if any(not 0 <= n < self.nblocks for n in blocks):
            raise ValueError("block beyond the filesystem")
        await self.device.write_blocks(blocks)

    async def flush(self):
        await self.device.flush()


def open_replica_array(cfg: ClusterConfig, name: str, d: str, cache: int):
    """Server `name`'s array. After an unclean stop while degraded (e.g. `kill -9` in the
    middle of a rebuild under writes) some of its blocks are lost to the RAID-5 write
    hole, and which filesystem blocks they were cannot be known. A replica with a
    partner then makes those rows whole with the lost blocks zeroed, makes its
    filesystem anew and takes a full copy from the partner (replication/needscopy.py);
    its rebuild goes on. Without a partner the array is refused, as md refuses it.
    While the mark of that is there (a start before the copy ended, or a crash in the
    middle of making the filesystem), the filesystem is made anew again."""
    marked = needscopy.marked(d)
    try:
        array = open_array(d, checksum_cache=cache)
    except WriteHole as exc:
        if len(cfg.group_servers(cfg.group_of(name))) < 2:
            raise
        log.warning("%s: %s", name, exc)
        # the mark first: a crash from here on must not leave a replica that looks whole
        needscopy.mark(d, "its array lost blocks to the write hole at an unclean stop "
                          "while degraded; its filesystem was made anew")
        marked = True
        array = open_array(d, checksum_cache=cache, zero_lost=True)
        log.warning("%s: %d blocks lost to the write hole were zeroed", name, array.zeroed)
    if not marked:
        return array
    try:
        trio.run(make_filesystem, array, cfg.group_of(name))
    except BaseException:
        array.close()
        raise
    log.warning("%s: its filesystem was made anew (%s); it takes a full copy from its "
                "partner before it may serve as primary", name, needscopy.NAME)
    return array
