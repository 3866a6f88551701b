"""A file's block map: a radix tree of u32 block pointers rooted in its inode.

`depth` 0: `root` is the data block of index 0 (or 0 for none). `depth` d >= 1: `root`
is an indirect block of 1024 pointers, each the root of a subtree of depth d-1, so the
tree addresses 1024**d blocks. A zero pointer is a hole: it reads as zeros and takes no
space. The tree grows in depth as the file does (up to MAX_DEPTH = 4 TiB of file).
"""

from __future__ import annotations

import errno
import struct

from replfs.fs.errors import FsError
from replfs.fs.layout import MAX_DEPTH, PTRS_PER_BLOCK, Inode
from replfs.fs.op import Op


def capacity(depth: int) -> int:
    return PTRS_PER_BLOCK ** depth


def _ptr(data: bytes, i: int) -> int:
    return struct.unpack_from("<I", data, 4 * i)[0]


async def lookup(op: Op, node: Inode, idx: int) -> int:
    """The block holding file block `idx`, or 0 for a hole."""
    if node.root == 0 or idx >= capacity(node.depth):
        return 0
    blk = node.root
    for level in range(node.depth - 1, -1, -1):
        data = await op.read_block(blk)
        blk = _ptr(data, (idx // PTRS_PER_BLOCK ** level) % PTRS_PER_BLOCK)
        if blk == 0:
            return 0
    return blk


async def lookup_range(op: Op, node: Inode, idx: int, count: int) -> list[int]:
    """Blocks for file blocks idx..idx+count-1 (0 for holes), reading each indirect
    block once."""
    out: list[int] = []
    if node.root == 0:
        return [0] * count
    if node.depth == 0:
        return [node.root if i == 0 else 0 for i in range(idx, idx + count)]
    i = idx
    end = idx + count
    cap = capacity(node.depth)
    while i < end:
        if i >= cap:
            out.extend([0] * (end - i))
            break
        # walk to the leaf indirect block covering i
        blk = node.root
        for level in range(node.depth - 1, 0, -1):
            data = await op.read_block(blk)
            blk = _ptr(data, (i // PTRS_PER_BLOCK ** level) % PTRS_PER_BLOCK)
            if blk == 0:
                break
        leaf_end = min(end, (i // PTRS_PER_BLOCK + 1) * PTRS_PER_BLOCK)
        if blk == 0:
            out.extend([0] * (leaf_end - i))
        else:
            ptrs = memoryview(await op.read_block(blk)).cast("I")
            out.extend(ptrs[j % PTRS_PER_BLOCK] for j in range(i, leaf_end))
        i = leaf_end
    return out


async def ensure(op: Op, ino: int, node: Inode, idx: int, near: int | None = None) -> tuple[int, bool]:
    """The block for file block `idx`, allocating it (and any indirect blocks) if it is
    a hole. Returns (block, newly_allocated). A new data block is NOT zeroed: the caller
    writes all of it. The caller holds X on the inode and writes it back afterwards."""
    if idx >= capacity(MAX_DEPTH):
        raise FsError(errno.EFBIG, "file too large")
    # grow the tree until it covers idx
    while idx >= capacity(node.depth):
        if node.root:
            new = await op.new_block(near=node.root)
            node.blocks += 1
            await op.write_block(new, 0, struct.pack("<I", node.root), undo=False)
            node.root = new
        node.depth += 1
    if node.depth == 0:
        if node.root == 0:
            node.root = await op.new_block(near=near, zero=False)
            node.blocks += 1
            return node.root, True
        return node.root, False
    if node.root == 0:
        node.root = await op.new_block(near=near)
        node.blocks += 1
    blk = node.root
    for level in range(node.depth - 1, -1, -1):
        slot = (idx // PTRS_PER_BLOCK ** level) % PTRS_PER_BLOCK
        data = await op.read_block(blk)
        child = _ptr(data, slot)
        fresh = False
        if child == 0:
            child = await op.new_block(near=near if level == 0 else blk, zero=level > 0)
            node.blocks += 1
            await op.write_block(blk, 4 * slot, struct.pack("<I", child))
            fresh = True
        if level == 0:
            return child, fresh
        blk = child
    raise AssertionError("unreachable")


async def truncate(op: Op, node: Inode, keep: int) -> None:
    """Free every file block with index >= keep (and indirect blocks left empty)."""
    if node.root == 0:
        return
    if node.depth == 0:
        if keep == 0:
            await op.free_block(node.root)
            node.blocks -= 1
            node.root = 0
        return
    if keep >= capacity(node.depth):
        return
    if await _truncate(op, node, node.root, node.depth, 0, keep):
        node.root = 0
        node.depth = 0


async def _truncate(op: Op, node: Inode, blk: int, level: int, base: int, keep: int) -> bool:
    """Truncate the subtree at `blk` (height `level`, first file block `base`); True if
    it was freed entirely."""
    if level == 0:
        if base >= keep:
            await op.free_block(blk)
            node.blocks -= 1
            return True
        return False
    span = PTRS_PER_BLOCK ** (level - 1)
    ptrs = list(memoryview(await op.read_block(blk)).cast("I"))
    whole = base >= keep
    for i, child in enumerate(ptrs):
        if child == 0:
            continue
        cbase = base + i * span
        if cbase + span <= keep:
            continue
        freed = await _truncate(op, node, child, level - 1, cbase, keep)
        if freed and not whole:
            await op.write_block(blk, 4 * i, b"\0\0\0\0")
    if whole:
        await op.free_block(blk)
        node.blocks -= 1
        return True
    return False


async def all_blocks(op: Op, node: Inode) -> list[int]:
    """Every block the map uses, indirect blocks included (for fsck)."""
    out: list[int] = []

    async def walk(blk: int, level: int) -> None:
        out.append(blk)
        if level == 0:
            return
        for child in memoryview(await op.read_block(blk)).cast("I"):
            if child:
                await walk(child, level - 1)
    if node.root:
        await walk(node.root, node.depth)
    return out
