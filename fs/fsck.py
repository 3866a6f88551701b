"""`fsck`: check (and optionally repair) one filesystem's consistency.

Checks: every directory entry points at an allocated inode; every allocated inode is
reachable from the root (or is an orphan); link counts match the entries (directories:
2 + subdirectories); directories' parent pointers; the block map matches the blocks the
inodes use (none used twice, none used but free, none marked used but unreferenced); the
inode map matches the allocated inodes.

Repair (`repair=True`) fixes link counts and parent pointers, removes entries that point
nowhere, links unreachable inodes into /lost+found, and rewrites both maps from what is
reachable. Each repair is a transaction of its own.
"""

from __future__ import annotations

import stat
from collections import Counter
from dataclasses import dataclass, field

from replfs.fs import blockmap, directory
from replfs.fs.layout import (FIRST_FREE_SLOT, INODE_SIZE, INODES_PER_BLOCK, ORPHAN_SLOT,
                              ROOT_SLOT, Inode, make_ino)
from replfs.fs.op import Op


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    inodes: int = 0
    directories: int = 0
    blocks_used: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


async def fsck(fs, repair: bool = False) -> FsckReport:
    rep = FsckReport()
    sb = fs.sb
    g = sb.group
    root, orphan = make_ino(g, ROOT_SLOT), make_ino(g, ORPHAN_SLOT)

    async def scan(txn):
        op = Op(fs, txn)
        refs: Counter[int] = Counter()
        subdirs: Counter[int] = Counter()
        parent_of: dict[int, int] = {}
        nodes: dict[int, Inode] = {}
        bad_entries: list[tuple[int, bytes]] = []
        queue = [root, orphan]
        seen_dirs = set(queue)
        while queue:
            d = queue.pop()
            node = await op.inode(d, "S", must_exist=False)
            nodes[d] = node
            for name, ino, typ, h, b in await directory.all_entries(op, node):
                slot = ino & ((1 << 48) - 1)
                ok = (ino >> 48) == g and FIRST_FREE_SLOT <= slot < sb.ninodes \
                    and fs.imap.mem[slot]
                child = await op.inode(ino, "S", must_exist=False) if ok else None
                if child is None or child.mode == 0:
                    rep.problems.append(f"entry {name!r} in directory {d} points to "
                                        f"inode {ino}, which is not allocated")
                    bad_entries.append((d, name))
                    continue
                if d != orphan:
                    refs[ino] += 1
                nodes[ino] = child
                if child.is_dir and d != orphan:
                    subdirs[d] += 1
                    parent_of[ino] = d
                    if ino in seen_dirs:
                        rep.problems.append(f"directory {ino} has more than one name")
                        continue
                if child.is_dir and ino not in seen_dirs:
                    seen_dirs.add(ino)
                    queue.append(ino)
        return op, refs, subdirs, parent_of, nodes, bad_entries

    op, refs, subdirs, parent_of, nodes, bad_entries = await fs.mgr.run(scan, name="fsck-scan")
    rep.directories = sum(1 for n in nodes.values() if n.is_dir)

    # allocated inodes
    fixes_nlink: dict[int, int] = {}
    fixes_parent: dict[int, int] = {}
    unreachable: list[int] = []
    imap_fix: list[tuple[int, int]] = []

    async def scan_inodes(txn):
        op = Op(fs, txn)
        used_blocks: Counter[int] = Counter()
        allocated = []
        # every slot of the inode table: a used inode the map calls free is a problem too
        for tblk in range(sb.itable_blocks):
            data = await txn.read(sb.itable_start + tblk)
            for k in range(INODES_PER_BLOCK):
                slot = tblk * INODES_PER_BLOCK + k
                if slot < FIRST_FREE_SLOT:
                    continue
                in_use = Inode.unpack(data[k * INODE_SIZE:(k + 1) * INODE_SIZE]).mode != 0
                if in_use and not fs.imap.mem[slot]:
                    rep.problems.append(f"inode {make_ino(g, slot)} is in use but marked free "
                                        "in the inode map")
                    imap_fix.append((slot, 1))
                if fs.imap.mem[slot] or in_use:
                    allocated.append(make_ino(g, slot))
        for ino in [root, orphan] + allocated:
            node = nodes.get(ino) or await op.inode(ino, "S", must_exist=False)
            nodes[ino] = node
            if node.mode == 0:
                rep.problems.append(f"inode {ino} is marked allocated but is empty")
                imap_fix.append((ino & ((1 << 48) - 1), 0))
                continue
            for blk in await blockmap.all_blocks(op, node):
                used_blocks[blk] += 1
            if node.xattr_block:
                used_blocks[node.xattr_block] += 1
        return allocated, used_blocks

    allocated, used_blocks = await fs.mgr.run(scan_inodes, name="fsck-inodes")
    rep.inodes = len(allocated)
    orphan_members = set()
    for name, ino, typ, h, b in await _entries(fs, orphan):
        orphan_members.add(ino)

    for ino in allocated:
        node = nodes[ino]
        if node.mode == 0:
            continue
        if ino not in refs and ino not in orphan_members:
            rep.problems.append(f"inode {ino} ({_kind(node)}) is allocated but unreachable")
            unreachable.append(ino)
            continue
        want = (2 + subdirs[ino]) if node.is_dir else refs[ino]
        if ino in orphan_members and ino not in refs:
            want = 0
        if node.nlink != want:
            rep.problems.append(f"inode {ino} ({_kind(node)}) has link count {node.nlink}, "
                                f"but {want} names")
            fixes_nlink[ino] = want
        if node.is_dir and ino in parent_of and node.parent != parent_of[ino]:
            rep.problems.append(f"directory {ino} records parent {node.parent}, but is in {parent_of[ino]}")
            fixes_parent[ino] = parent_of[ino]
    for d in (root,):
        want = 2 + subdirs[d]
        if nodes[d].nlink != want:
            rep.problems.append(f"root directory has link count {nodes[d].nlink}, but {want}")
            fixes_nlink[d] = want

    # block map
    for blk, n in used_blocks.items():
        if n > 1:
            rep.problems.append(f"block {blk} is used {n} times")
        if not sb.data_start <= blk < sb.nblocks:
            rep.problems.append(f"block {blk} is referenced but outside the data area")
        elif not fs.bmap.mem[blk]:
            rep.problems.append(f"block {blk} is in use but marked free")
    leaked = [b for b in range(sb.data_start, sb.nblocks) if fs.bmap.mem[b] and b not in used_blocks]
    if leaked:
        rep.problems.append(f"{len(leaked)} blocks are marked used but belong to no inode "
                            f"(first: {leaked[:5]})")
    rep.blocks_used = len(used_blocks)

    if repair and rep.problems:
        await _repair(fs, rep, bad_entries, fixes_nlink, fixes_parent, unreachable,
                      used_blocks, leaked, nodes)
        if imap_fix:
            async def fix_imap(txn):
                for slot, val in imap_fix:
                    await fs.imap.repair(txn, slot, bool(val))
            await fs.mgr.run(fix_imap, name="fsck-repair")
            rep.repaired.append(f"corrected {len(imap_fix)} entries of the inode map")
    return rep


async def _entries(fs, ino):
    async def fn(txn):
        op = Op(fs, txn)
        return await directory.all_entries(op, await op.inode(ino, "S", must_exist=False))
    return await fs.mgr.run(fn, name="fsck-entries")


def _kind(node: Inode) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(
        node.mode & 0o170000, "special file")


async def _repair(fs, rep, bad_entries, fixes_nlink, fixes_parent, unreachable, used_blocks,
                  leaked, nodes) -> None:
    sb = fs.sb
    root = make_ino(sb.group, ROOT_SLOT)
    # the block map first (before any repair allocates): mark referenced blocks used,
    # free leaked ones
    async def fix_map(txn):
        n = 0
        for blk in used_blocks:
            if sb.data_start <= blk < sb.nblocks:
                n += await fs.bmap.repair(txn, blk, True)
        for blk in leaked:
            n += await fs.bmap.repair(txn, blk, False)
        return n
    if leaked or any(not fs.bmap.mem[b] for b in used_blocks if b < sb.nblocks):
        n = await fs.mgr.run(fix_map, name="fsck-repair")
        rep.repaired.append(f"corrected {n} entries of the block map")
    for d, name in bad_entries:
        async def rm(txn, d=d, name=name):
            op = Op(fs, txn)
            node = await op.inode(d, "X", must_exist=False)
            await directory.remove(op, node, name)
            await op.put(d, node)
        await fs.mgr.run(rm, name="fsck-repair")
        rep.repaired.append(f"removed entry {name!r} from directory {d}")
    for ino, want in fixes_nlink.items():
        async def fix(txn, ino=ino, want=want):
            op = Op(fs, txn)
            node = await op.inode(ino, "X", must_exist=False)
            node.nlink = want
            if ino in fixes_parent:
                node.parent = fixes_parent[ino]
            await op.put(ino, node)
        await fs.mgr.run(fix, name="fsck-repair")
        rep.repaired.append(f"set link count of inode {ino} to {want}")
    if unreachable:
        lf_name = b"lost+found"
        lf = None
        try:
            lf = (await fs.lookup(root, lf_name)).ino
        except Exception:
            lf = (await fs.mkdir(root, lf_name, 0o700, 0, 0)).ino
        for ino in unreachable:
            async def relink(txn, ino=ino):
                op = Op(fs, txn)
                pnode = await op.inode(lf, "X")
                node = await op.inode(ino, "X", must_exist=False)
                name = b"#%d" % ino
                await directory.insert(op, pnode, name, ino, (node.mode & 0o170000) >> 12)
                if node.is_dir:
                    node.nlink = 2
                    node.parent = lf
                    pnode.nlink += 1
                else:
                    node.nlink = 1
                await op.put(ino, node)
                await op.put(lf, pnode)
            await fs.mgr.run(relink, name="fsck-repair")
            rep.repaired.append(f"linked unreachable inode {ino} into /lost+found")

