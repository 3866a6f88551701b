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
        blk = await _find_leaf(op, node, i)
        leaf_end = min(end, (i // PTRS_PER_BLOCK + 1) * PTRS_PER_BLOCK)
        if blk == 0:
            out.extend([0] * (leaf_end - i))
        else:
            ptrs = memoryview(await op.read_block(blk)).cast("I")
            out.extend(ptrs[j % PTRS_PER_BLOCK] for j in range(i, leaf_end))
        i = leaf_end
    return out


async def _find_leaf(op: Op, node: Inode, idx: int) -> int:
    """The level-0 indirect block covering file block idx (depth >= 1, idx within the
    tree's capacity), or 0 where the path to it is a hole."""
    blk = node.root
    for level in range(node.depth - 1, 0, -1):
        blk = _ptr(await op.read_block(blk), (idx // PTRS_PER_BLOCK ** level) % PTRS_PER_BLOCK)
        if blk == 0:
            return 0
    return blk


def _leaves(first: int, end: int):
    """(start, stop) of each stretch of file blocks first..end-1 under one leaf."""
    i = first
    while i < end:
        stop = min(end, (i // PTRS_PER_BLOCK + 1) * PTRS_PER_BLOCK)
        yield i, stop
        i = stop


async def needed(op: Op, node: Inode, first: int, count: int) -> int:
    """How many blocks `ensure_range(first, count)` would allocate: the holes, and a
    leaf indirect block for each stretch of 1024 whose leaf is missing. Not counted: the
    indirect blocks above the leaves and the tree's growth (one block per 4 GiB of file
    at most)."""
    end = first + count
    if node.depth == 0:
        if end <= 1:
            return 0 if node.root else 1
        held = 1 if node.root and first == 0 else 0
        return count - held + len(list(_leaves(first, end)))
    total = 0
    cap = capacity(node.depth)
    for i, stop in _leaves(first, end):
        leaf = await _find_leaf(op, node, i) if i < cap and node.root else 0
        if leaf == 0:
            total += 1 + stop - i
        else:
            ptrs = memoryview(await op.read_block(leaf)).cast("I")
            lo = i % PTRS_PER_BLOCK
            total += ptrs[lo:lo + stop - i].tolist().count(0)
    return total


async def punch(op: Op, node: Inode, first: int, count: int) -> None:
    """Free the data blocks of file blocks first..first+count-1: they become holes (read
    as zeros, take no space). The indirect blocks stay, for a later write to fill."""
    if node.root == 0 or count <= 0:
        return
    if node.depth == 0:
        if first == 0:
            await _free_root(op, node)
        return
    for i, stop in _leaves(first, min(first + count, capacity(node.depth))):
        leaf = await _find_leaf(op, node, i)
        if leaf == 0:
            continue
        lo = i % PTRS_PER_BLOCK
        ptrs = memoryview(await op.read_block(leaf)).cast("I")[lo:lo + stop - i].tolist()
        freed = [b for b in ptrs if b]
        if freed:
            await op.free_blocks(freed)
            node.blocks -= len(freed)
            await op.write_block(leaf, 4 * lo, bytes(4 * len(ptrs)))


async def ensure(op: Op, node: Inode, idx: int, near: int | None = None) -> tuple[int, bool]:
    """The block for file block `idx`, allocating it (and any indirect blocks) if it is
    a hole. Returns (block, newly_allocated). A new data block is NOT zeroed: the caller
    writes all of it. The caller holds X on the inode and writes it back afterwards."""
    if idx >= capacity(MAX_DEPTH):
        raise FsError(errno.EFBIG, "file too large")
    await _grow(op, node, idx)
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


async def _free_root(op: Op, node: Inode) -> None:
    """Free the one data block of a depth-0 map."""
    await op.free_block(node.root)
    node.blocks -= 1
    node.root = 0


async def truncate(op: Op, node: Inode, keep: int) -> None:
    """Free every file block with index >= keep (and indirect blocks left empty)."""
    if node.root == 0:
        return
    if node.depth == 0:
        if keep == 0:
            await _free_root(op, node)
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
    if level == 1:
        # the data blocks it points to: freed together (one map write per run), their
        # pointers zeroed together (they are every pointer from the first one on)
        first = max(0, keep - base)
        freed = [child for child in ptrs[first:] if child]
        if freed:
            await op.free_blocks(freed)
            node.blocks -= len(freed)
        if whole:
            await op.free_block(blk)
            node.blocks -= 1
            return True
        if freed:
            last = max(i for i in range(first, len(ptrs)) if ptrs[i])
            await op.write_block(blk, 4 * first, bytes(4 * (last + 1 - first)))
        return False
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


async def ensure_range(op: Op, node: Inode, first: int, count: int,
                       near: int | None = None) -> list[tuple[int, bool]]:
    """(block, newly_allocated) for file blocks first..first+count-1, allocating holes
    as contiguous runs with one pointer write per run and leaf (the bulk-write path of
    `ensure`). New data blocks are NOT zeroed."""
    end = first + count
    if end > capacity(MAX_DEPTH):
        raise FsError(errno.EFBIG, "file too large")
    if end <= 1:
        return [await ensure(op, node, first, near)]
    await _grow(op, node, end - 1)
    out: list[tuple[int, bool]] = []
    i = first
    while i < end:
        leaf_end = min(end, (i // PTRS_PER_BLOCK + 1) * PTRS_PER_BLOCK)
        leaf = await _leaf(op, node, i)
        ptrs = memoryview(await op.read_block(leaf)).cast("I")
        cur = [ptrs[j % PTRS_PER_BLOCK] for j in range(i, leaf_end)]
        holes = [k for k, b in enumerate(cur) if b == 0]
        if holes:
            if near is None:
                prev = next((b for b in reversed(cur[:holes[0]]) if b), 0)
                near = prev + 1 if prev else None
            fresh = await op.new_blocks(len(holes), near)
            node.blocks += len(fresh)
            for k, b in zip(holes, fresh):
                cur[k] = b
            # write the new pointers, one write per run of consecutive holes
            r = 0
            while r < len(holes):
                q = r
                while q + 1 < len(holes) and holes[q + 1] == holes[q] + 1:
                    q += 1
                slot = (i + holes[r]) % PTRS_PER_BLOCK
                vals = struct.pack(f"<{q - r + 1}I", *(cur[k] for k in holes[r:q + 1]))
                await op.write_block(leaf, 4 * slot, vals)
                r = q + 1
            hole_set = set(holes)
            out.extend((b, k in hole_set) for k, b in enumerate(cur))
            near = fresh[-1] + 1
        else:
            out.extend((b, False) for b in cur)
            near = cur[-1] + 1
        i = leaf_end
    return out


async def _leaf(op: Op, node: Inode, idx: int) -> int:
    """The level-0 indirect block covering file block idx (depth >= 1), creating the
    path to it."""
    if node.root == 0:
        node.root = await op.new_block()
        node.blocks += 1
    blk = node.root
    for level in range(node.depth - 1, 0, -1):
        slot = (idx // PTRS_PER_BLOCK ** level) % PTRS_PER_BLOCK
        child = _ptr(await op.read_block(blk), slot)
        if child == 0:
            child = await op.new_block(near=blk)
            node.blocks += 1
            await op.write_block(blk, 4 * slot, struct.pack("<I", child))
        blk = child
    return blk


async def _grow(op: Op, node: Inode, idx: int) -> None:
    """Deepen the tree until it covers file block idx (the old tree becomes the first
    subtree of a new root)."""
    while idx >= capacity(node.depth):
        if node.root:
            new = await op.new_block(near=node.root)
            node.blocks += 1
            await op.write_block(new, 0, struct.pack("<I", node.root), undo=False)
            node.root = new
        node.depth += 1
