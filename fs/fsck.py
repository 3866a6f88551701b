"""`fsck`: check (and optionally repair) one replica group's filesystem.

Checks: every directory entry points at an allocated inode of the right type; every
allocated inode is reachable from a root (or is an orphan); link counts match the names
(files: every name, wherever it is; directories: 2 + the subdirectory entries they
hold); a directory has one name and records it as its parent; the block map matches the
blocks the inodes use (none used twice, none used but free, none marked used but
unreferenced); the inode map matches the allocated inodes.

Replica groups. The namespace is spread over several groups, each with its own
filesystem; an entry may name an inode of another group (its number carries the group:
`ino >> 48`), and a directory's parent (`..`) may be in another group. Only group 0's root
is the namespace's root; the root of a group g > 0 exists, stays empty and needs no name.
So one group's check cannot see everything:

- entries of this group that name another group's inode are not checked here; they are
  collected in `report.outgoing` as (dir_ino, name, child_ino, type), and local
  directories whose `..` is in another group in `report.foreign_parents`
  {dir_ino: parent_ino}. A directory's link count needs only its own entries (an entry
  naming a foreign subdirectory counts by its type), so it is always checked.
- `external` (the caller's): the entries of the other groups that name inodes of this
  group, i.e. the other groups' `outgoing` (`incoming(group, reports)` picks them). With
  it, those names count for link counts and make their targets (and subtrees) reachable,
  a directory whose parent is foreign must be named by exactly that parent, and an
  entry naming an inode that this group does not have is reported
  (`report.dangling_incoming`). `external=[]` says that nothing outside names this group
  (a filesystem that is the whole namespace).
- `external=None` (the group checked alone): inodes that no local directory names, and
  files with more links than local names, may be named from another group; they are
  listed in `report.notes`, not as problems, and nothing is repaired on that account.

A group with prepared two-phase-commit transactions in doubt (`mgr.in_doubt()`) is not
scanned: those transactions hold locks on what they changed (a scan would wait for them)
and their outcome is not decided; fsck reports them and returns at once.

Repair (`repair=True`) rewrites both maps from what is found, removes entries that point
nowhere, fixes entry types, link counts and parent pointers, and links unreachable inodes
into /lost+found (group 0 only: another group's inode can be named in the namespace only
through group 0). It repairs cross-group link counts only when `external` was given. Each
repair is a transaction of its own.

Messages show group 0's inode numbers in decimal and other groups' as GROUP:SLOT.
"""

from __future__ import annotations

import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from replfs.fs import blockmap, directory
from replfs.fs.errors import FsError
from replfs.fs.layout import (FIRST_FREE_SLOT, INODE_SIZE, INODES_PER_BLOCK, ORPHAN_SLOT,
                              ROOT_SLOT, S_IFDIR, S_IFMT, Inode, ino_group, ino_slot,
                              make_ino)
from replfs.fs.op import Op
from replfs.raid.blockdev import BlockIOError

DT_DIR = S_IFDIR >> 12
Entry = tuple[int, bytes, int, int]       # (dir_ino, name, child_ino, type)
SHOW = 5                                  # inode numbers listed in an aggregated message


@dataclass
class FsckReport:
    group: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inodes: int = 0
    directories: int = 0
    blocks_used: int = 0
    scanned: bool = False       # False: not scanned (transactions in doubt)
    in_doubt: int = 0
    outgoing: list[Entry] = field(default_factory=list)
    foreign_parents: dict[int, int] = field(default_factory=dict)
    dangling_incoming: list[Entry] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return dict(group=self.group, clean=self.clean, scanned=self.scanned,
                    problems=self.problems, repaired=self.repaired, notes=self.notes,
                    inodes=self.inodes, directories=self.directories,
                    blocks_used=self.blocks_used, in_doubt=self.in_doubt,
                    outgoing=[[d, n.decode(errors="replace"), c, t] for d, n, c, t in self.outgoing],
                    foreign_parents={str(d): p for d, p in self.foreign_parents.items()})


def incoming(group: int, reports: Iterable[FsckReport]) -> list[Entry]:
    """The `external` argument for `group`: the other groups' entries that name its inodes."""
    return [e for r in reports if r.group != group for e in r.outgoing
            if ino_group(e[2]) == group]


def fmt(ino: int) -> str:
    """An inode number as messages show it: decimal in group 0, g:slot elsewhere."""
    g = ino_group(ino)
    return str(ino) if g == 0 else f"{g}:{ino_slot(ino)}"


def _kind(node: Inode) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(
        node.mode & S_IFMT, "special file")


def _type_of(node: Inode) -> int:
    return (node.mode & S_IFMT) >> 12


def _first(inos) -> str:
    inos = list(inos)
    more = ", ..." if len(inos) > SHOW else ""
    return ", ".join(fmt(i) for i in inos[:SHOW]) + more


@dataclass
class _Scan:
    nodes: dict[int, Inode]          # root, orphan and every allocated inode
    allocated: list[int]             # slots >= FIRST_FREE_SLOT, marked used or in use
    entries: list[Entry]             # every entry of every local directory
    used_blocks: Counter
    imap_fix: list[tuple[int, bool]]
    unreadable: list[int]            # directories whose entries could not be read
    unmapped: list[int]              # inodes whose block map could not be read
    owners: dict[int, int]           # block -> inode using it, for the blocks asked


async def _scan(fs, rep: FsckReport, want: frozenset[int] = frozenset()) -> _Scan:
    """Every inode, entry and used block of the group; `owners` names the inode that
    uses each block of `want` (fs/owners.py)."""
    sb = fs.sb
    g = sb.group

    async def scan(txn):
        op = Op(fs, txn)
        nodes: dict[int, Inode] = {}
        allocated: list[int] = []
        entries: list[Entry] = []
        used: Counter[int] = Counter()
        imap_fix: list[tuple[int, bool]] = []
        unreadable: list[int] = []
        unmapped: list[int] = []
        owners: dict[int, int] = {}
        # every slot of the inode table: a used inode the map calls free is a problem too
        for tblk in range(sb.itable_blocks):
            data = await txn.read(sb.itable_start + tblk)
            for k in range(INODES_PER_BLOCK):
                slot = tblk * INODES_PER_BLOCK + k
                if slot < FIRST_FREE_SLOT or slot >= sb.ninodes:
                    continue
                in_use = Inode.unpack(data[k * INODE_SIZE:(k + 1) * INODE_SIZE]).mode != 0
                if in_use and not fs.imap.mem[slot]:
                    rep.problems.append(f"inode {fmt(make_ino(g, slot))} is in use but marked "
                                        "free in the inode map")
                    imap_fix.append((slot, True))
                if fs.imap.mem[slot] or in_use:
                    allocated.append(make_ino(g, slot))
        root, orphan = make_ino(g, ROOT_SLOT), make_ino(g, ORPHAN_SLOT)
        for ino in [root, orphan] + allocated:
            node = await op.inode(ino, "S", must_exist=False)
            nodes[ino] = node
            if node.mode == 0:
                if ino in (root, orphan):
                    what = "root" if ino == root else "orphan"
                    rep.problems.append(f"the {what} directory of group {g} is missing")
                else:
                    rep.problems.append(f"inode {fmt(ino)} is marked allocated but is empty")
                    imap_fix.append((ino_slot(ino), False))
                continue
            try:
                blocks = await blockmap.all_blocks(op, node)
            except BlockIOError as exc:       # a lost block of its map (indirect)
                rep.problems.append(f"the block map of inode {fmt(ino)} cannot be read: "
                                    f"{exc}")
                unmapped.append(ino)
                blocks = [exc.block]
            if node.xattr_block:
                blocks.append(node.xattr_block)
            for blk in blocks:
                used[blk] += 1
                if blk in want:
                    owners[blk] = ino
            if node.is_dir:
                try:
                    ents = await directory.all_entries(op, node)
                except (FsError, BlockIOError) as exc:
                    rep.problems.append(f"directory {fmt(ino)} cannot be read: {exc.args[-1]}")
                    unreadable.append(ino)
                    continue
                entries.extend((ino, name, child, typ) for name, child, typ, _h, _b in ents)
        return _Scan(nodes, allocated, entries, used, imap_fix, unreadable, unmapped, owners)

    return await fs.mgr.run(scan, name="fsck-scan")


async def fsck(fs, repair: bool = False, external: Iterable[Entry] | None = None) -> FsckReport:
    """Check group `fs.sb.group`'s filesystem (see the module doc for `external`)."""
    sb = fs.sb
    g = sb.group
    rep = FsckReport(group=g)
    doubt = fs.mgr.in_doubt()
    if doubt:
        rep.in_doubt = len(doubt)
        rep.problems.append(f"{len(doubt)} distributed transaction{'s' if len(doubt) > 1 else ''}"
                            " in doubt: start the cluster so their coordinators resolve them")
        rep.notes.append("not scanned: transactions in doubt hold locks on what they changed "
                         "and their outcome is not decided yet")
        return rep
    root, orphan = make_ino(g, ROOT_SLOT), make_ino(g, ORPHAN_SLOT)
    ext: list[Entry] | None = None
    if external is not None:
        ext = [(d, bytes(n), c, t) for d, n, c, t in external
               if ino_group(c) == g and ino_group(d) != g]
    else:
        rep.notes.append(f"group {g} checked alone: names from other groups were not seen, so "
                         "reachability and file link counts are checked only as far as this "
                         "group's own names go")

    sc = await _scan(fs, rep)
    rep.scanned = True
    nodes = sc.nodes
    rep.inodes = len(sc.allocated)
    rep.directories = sum(1 for n in nodes.values() if n.is_dir)

    def local(ino: int) -> Inode | None:
        """The allocated inode `ino` of this group, or None."""
        if ino_group(ino) != g or ino_slot(ino) < FIRST_FREE_SLOT:
            return None
        node = nodes.get(ino)
        return node if node is not None and node.mode != 0 else None

    # ---- names
    names: dict[int, list[int]] = defaultdict(list)   # inode -> directories naming it
    children: dict[int, list[int]] = defaultdict(list)
    subdirs: Counter[int] = Counter()
    orphan_members: set[int] = set()
    bad_entries: list[tuple[int, bytes]] = []
    type_fixes: list[Entry] = []
    for d, name, ino, typ in sc.entries:
        if ino_group(ino) != g:
            if d == orphan:
                rep.problems.append(f"the orphan directory names inode {fmt(ino)} of another "
                                    "group")
                bad_entries.append((d, name))
            else:
                rep.outgoing.append((d, name, ino, typ))
                if typ == DT_DIR:
                    subdirs[d] += 1
            continue
        child = local(ino)
        if child is None:
            rep.problems.append(f"entry {name!r} in directory {fmt(d)} points to inode "
                                f"{fmt(ino)}, which is not allocated")
            bad_entries.append((d, name))
            continue
        if typ != _type_of(child):
            rep.problems.append(f"entry {name!r} in directory {fmt(d)} has type {typ}, but "
                                f"inode {fmt(ino)} is a {_kind(child)}")
            type_fixes.append((d, name, ino, _type_of(child)))
        if d == orphan:
            orphan_members.add(ino)
            continue
        names[ino].append(d)
        children[d].append(ino)
        if child.is_dir:
            subdirs[d] += 1
    ext_targets = []
    for e in ext or ():
        d, name, ino, typ = e
        child = local(ino)
        if child is None:
            rep.problems.append(f"entry {name!r} in directory {fmt(d)} (group {ino_group(d)}) "
                                f"points to inode {fmt(ino)}, which is not allocated")
            rep.dangling_incoming.append(e)
            continue
        if typ != _type_of(child):
            rep.problems.append(f"entry {name!r} in directory {fmt(d)} (group {ino_group(d)}) "
                                f"has type {typ}, but inode {fmt(ino)} is a {_kind(child)}")
        names[ino].append(d)
        ext_targets.append(ino)

    for ino, node in nodes.items():
        if (node.is_dir and ino not in (root, orphan) and node.parent
                and ino_group(node.parent) != g
                and not (ino in orphan_members and node.nlink == 0)):
            rep.foreign_parents[ino] = node.parent

    # ---- reachability: from the roots, the orphans and the names from other groups
    live = [ino for ino in sc.allocated if nodes[ino].mode != 0]
    presumed: list[int] = []          # named nowhere here: maybe from another group
    if ext is None:
        presumed = [ino for ino in live if not names[ino] and ino not in orphan_members]
    starts = [root, orphan, *orphan_members, *ext_targets, *presumed]
    reach = _reach(starts, children)
    tops = [ino for ino in live if ino not in reach and not names[ino]
            and ino not in orphan_members]
    below = _reach(tops, children)
    for ino in tops:
        node = nodes[ino]
        why = ""
        if node.is_dir and ino_group(node.parent) != g:
            why = (f" (it records parent {fmt(node.parent)} in group {ino_group(node.parent)}, "
                   "which does not name it)")
        n = len(_reach([ino], children)) - 1
        rep.problems.append(f"inode {fmt(ino)} ({_kind(node)}) is allocated but unreachable"
                            f"{why}{f'; {n} more inodes below it' if n else ''}")
    cycles = [ino for ino in live if ino not in reach and ino not in below]
    if cycles:
        rep.problems.append(f"{len(cycles)} directories are named only inside a cycle "
                            f"detached from the tree (not repaired): {_first(cycles)}")
    if presumed:
        rep.notes.append(f"{len(presumed)} inodes are named in no directory of group {g} "
                         f"(maybe from other groups; check the whole cluster): {_first(presumed)}")

    # ---- link counts, parents, roots
    fix_nlink: dict[int, int] = {}
    fix_parent: dict[int, int] = {}
    more_links: list[int] = []
    for ino in [root, orphan] + live:
        node = nodes[ino]
        if node.mode == 0 or ino in tops or ino in sc.unreadable:
            continue
        ns = names[ino]
        unnamed_orphan = ino in orphan_members and not ns
        if node.is_dir:
            want = 0 if unnamed_orphan else 2 + subdirs[ino]
        elif unnamed_orphan:
            want = 0
        elif ext is not None:
            want = len(ns)
        else:
            want = None
            if node.nlink < len(ns):
                rep.problems.append(f"inode {fmt(ino)} ({_kind(node)}) has link count "
                                    f"{node.nlink}, but {len(ns)} names in this group alone "
                                    "(check the whole cluster to repair it)")
            elif node.nlink > len(ns) and ns:
                more_links.append(ino)
        if want is not None and node.nlink != want:
            what = "root directory" if ino == root else f"inode {fmt(ino)} ({_kind(node)})"
            rep.problems.append(f"{what} has link count {node.nlink}, but {want} "
                                f"{'names' if not node.is_dir else 'expected'}")
            fix_nlink[ino] = want
        if not node.is_dir or ino in (root, orphan) or unnamed_orphan:
            continue
        if len(ns) > 1:
            rep.problems.append(f"directory {fmt(ino)} has {len(ns)} names (in directories "
                                f"{_first(ns)})")
        elif len(ns) == 1 and node.parent != ns[0]:
            rep.problems.append(f"directory {fmt(ino)} records parent {fmt(node.parent)}, but "
                                f"is in {fmt(ns[0])}")
            # a foreign recorded parent might name it too: only the whole cluster knows
            if ext is not None or ino_group(node.parent) == g:
                fix_parent[ino] = ns[0]
    if more_links:
        rep.notes.append(f"{len(more_links)} files have more links than names in group {g} "
                         f"(maybe named from other groups): {_first(more_links)}")
    if nodes[root].mode:
        if not nodes[root].is_dir:
            rep.problems.append(f"the root inode of group {g} is not a directory")
        elif g != 0 and nodes[root].dir_entries:
            rep.problems.append(f"the root directory of group {g} is not empty "
                                f"({nodes[root].dir_entries} entries; only group 0's root is "
                                "the namespace's)")

    # ---- block map
    for blk, n in sc.used_blocks.items():
        if n > 1:
            rep.problems.append(f"block {blk} is used {n} times")
        if not sb.data_start <= blk < sb.nblocks:
            rep.problems.append(f"block {blk} is referenced but outside the data area")
        elif not fs.bmap.mem[blk]:
            rep.problems.append(f"block {blk} is in use but marked free")
    leaked = [b for b in range(sb.data_start, sb.nblocks)
              if fs.bmap.mem[b] and b not in sc.used_blocks]
    if leaked and sc.unmapped:
        rep.notes.append(f"{len(leaked)} blocks marked used belong to no inode found; some "
                         "block maps could not be read, so they are kept")
        leaked = []
    if leaked:
        rep.problems.append(f"{len(leaked)} blocks are marked used but belong to no inode "
                            f"(first: {leaked[:5]})")
    rep.blocks_used = len(sc.used_blocks)

    if repair and rep.problems:
        relink = tops if ext is not None and not sc.unreadable else []
        if tops and sc.unreadable:
            rep.notes.append("unreachable inodes not relinked: a directory that could not be "
                             "read may name them")
        await _repair(fs, rep, sc, leaked, bad_entries, type_fixes, fix_nlink, fix_parent,
                      relink, subdirs)
    return rep


async def _run(fs, fn):
    """Run `fn(op)` as one transaction; the in-memory state (allocation maps, the cache
    of committed inodes) follows as after any filesystem operation."""
    ops: list[Op] = []

    async def attempt(txn):
        ops.append(Op(fs, txn))
        return await fn(ops[-1])
    result = await fs.mgr.run(attempt, name="fsck-repair")
    ops[-1].committed()
    return result


def _reach(starts, children) -> set[int]:
    seen: set[int] = set()
    stack = list(starts)
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        stack.extend(children.get(x, ()))
    return seen


async def _repair(fs, rep, sc: _Scan, leaked, bad_entries, type_fixes, fix_nlink, fix_parent,
                  tops, subdirs) -> None:
    sb = fs.sb
    g = sb.group
    root = make_ino(g, ROOT_SLOT)
    # both maps first, before any repair allocates
    used = sc.used_blocks
    if sc.imap_fix or leaked or any(sb.data_start <= b < sb.nblocks and not fs.bmap.mem[b]
                                    for b in used):
        async def fix_maps(txn):
            n = m = 0
            for blk in used:
                if sb.data_start <= blk < sb.nblocks:
                    n += await fs.bmap.repair(txn, blk, True)
            for blk in leaked:
                n += await fs.bmap.repair(txn, blk, False)
            for slot, val in sc.imap_fix:
                m += await fs.imap.repair(txn, slot, val)
            return n, m
        n, m = await fs.mgr.run(fix_maps, name="fsck-repair")
        if n:
            rep.repaired.append(f"corrected {n} entries of the block map")
        if m:
            rep.repaired.append(f"corrected {m} entries of the inode map")
    for d, name in bad_entries:
        async def rm(op, d=d, name=name):
            node = await op.inode(d, "X", must_exist=False)
            await directory.remove(op, node, name)
            await op.put(d, node)
        await _run(fs, rm)
        rep.repaired.append(f"removed entry {name!r} from directory {fmt(d)}")
    for d, name, ino, typ in type_fixes:
        async def retype(op, d=d, name=name, ino=ino, typ=typ):
            await directory.replace(op, await op.inode(d, "X", must_exist=False), name, ino, typ)
        await _run(fs, retype)
        rep.repaired.append(f"set the type of entry {name!r} in directory {fmt(d)} to {typ}")
    for ino in sorted(set(fix_nlink) | set(fix_parent)):
        async def fix(op, ino=ino):
            node = await op.inode(ino, "X", must_exist=False)
            if ino in fix_nlink:
                node.nlink = fix_nlink[ino]
            if ino in fix_parent:
                node.parent = fix_parent[ino]
            await op.put(ino, node)
        await _run(fs, fix)
        if ino in fix_nlink:
            rep.repaired.append(f"set link count of inode {fmt(ino)} to {fix_nlink[ino]}")
        if ino in fix_parent:
            rep.repaired.append(f"set parent of directory {fmt(ino)} to {fmt(fix_parent[ino])}")
    if tops and g != 0:
        rep.notes.append(f"{len(tops)} unreachable inode(s) of group {g} not relinked: only "
                         "group 0's /lost+found is in the namespace")
        return
    if not tops:
        return
    lf_name = b"lost+found"
    try:
        lf = (await fs.lookup(root, lf_name)).ino
    except FsError:
        lf = (await fs.mkdir(root, lf_name, 0o700, 0, 0)).ino
    for ino in tops:
        async def relink(op, ino=ino):
            pnode = await op.inode(lf, "X")
            node = await op.inode(ino, "X", must_exist=False)
            await directory.insert(op, pnode, b"#%d" % ino, ino, _type_of(node))
            if node.is_dir:
                node.nlink = 2 + subdirs[ino]
                node.parent = lf
                pnode.nlink += 1
            else:
                node.nlink = 1
            await op.put(ino, node)
            await op.put(lf, pnode)
        await _run(fs, relink)
        rep.repaired.append(f"linked unreachable inode {fmt(ino)} into /lost+found")


async def remove_entries(fs, entries: Iterable[Entry]) -> list[str]:
    """Remove entries of this group's directories (each only if it still names that inode):
    the cluster check's repair of entries that name an inode another group does not have.
    A removed directory entry also takes one from the directory's link count."""
    done = []
    for d, name, ino, typ in entries:
        async def rm(op, d=d, name=name, ino=ino, typ=typ):
            node = await op.inode(d, "X", must_exist=False)
            if not node.is_dir or await directory.lookup(op, node, name) != (ino, typ):
                return False
            await directory.remove(op, node, name)
            if typ == DT_DIR:
                node.nlink -= 1
            await op.put(d, node)
            return True
        if await _run(fs, rm):
            done.append(f"removed entry {name!r} from directory {fmt(d)} (it named inode "
                        f"{fmt(ino)}, which group {ino_group(ino)} does not have)")
    return done
