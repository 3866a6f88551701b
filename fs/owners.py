"""Which files own given blocks: what `replfs status` says of blocks that are lost.

`block_owners(fs, blocks)` walks the group's inodes, block maps and directories with the
same scan `fsck` makes (fsck.py `_scan`, one read-only transaction) and answers, for
each block, the inode whose data, indirect or xattr block it is, and a path for that
inode built from the group's own directory entries. A path stops where this group's
names stop: at group 0's root ("/a/b"), or at a directory whose name is kept by another
group (its parent is foreign: "…/b", `from_dir` names that directory and `from_parent`
its parent, for a caller that can ask the other groups: replication/lostnames.py). Blocks that no
inode owns are named by the region they lie in (superblock, log, maps, inode table) or
"unused".
"""

from __future__ import annotations

from replfs.fs.fsck import FsckReport, _scan, fmt
from replfs.fs.layout import ROOT_SLOT, make_ino

MAX_DEPTH = 256       # directory levels a path is followed up


def _region(sb, block: int) -> str:
    for name, start, n in (("log", sb.log_start, sb.log_blocks),
                           ("block map", sb.bmap_start, sb.bmap_blocks),
                           ("inode map", sb.imap_start, sb.imap_blocks),
                           ("inode table", sb.itable_start, sb.itable_blocks)):
        if start <= block < start + n:
            return name
    if block < sb.data_start:
        return "superblock"
    return "unused" if block < sb.nblocks else "replication state"


def _path(ino: int, root: int, named: dict[int, tuple[int, bytes]]) -> tuple[str, int | None]:
    """(path, None) if the names reach group 0's root, else ("…/rest", the directory
    whose name is not in this group)."""
    parts: list[str] = []
    cur = ino
    for _ in range(MAX_DEPTH):
        if cur == root:
            return "/" + "/".join(reversed(parts)), None
        up = named.get(cur)
        if up is None:
            break
        parts.append(up[1].decode(errors="replace"))
        cur = up[0]
    return "…/" + "/".join(reversed(parts)), cur


async def block_owners(fs, blocks, limit: int = 20) -> dict:
    """{"files": [{ino, inode (as fsck shows it), path, from_dir, from_parent, blocks}] (at most
    `limit`, those with the most lost blocks first), "more_files": how many were left
    out, "other": {region: count} for blocks that belong to no file}."""
    want = frozenset(blocks)
    sc = await _scan(fs, FsckReport(group=fs.sb.group), want)
    named = {child: (d, name) for d, name, child, _t in sc.entries}
    root = make_ino(0, ROOT_SLOT)
    per: dict[int, list[int]] = {}
    other: dict[str, int] = {}
    for b in sorted(want):
        ino = sc.owners.get(b)
        if ino is None:
            r = _region(fs.sb, b)
            other[r] = other.get(r, 0) + 1
        else:
            per.setdefault(ino, []).append(b)
    files = []
    for ino, bl in sorted(per.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:limit]:
        path, top = _path(ino, root, named)
        node = sc.nodes.get(top) if top is not None else None
        files.append(dict(ino=ino, inode=fmt(ino), path=path, from_dir=top,
                          from_parent=node.parent if node is not None and node.parent else None,
                          blocks=bl))
    return dict(files=files, more_files=max(0, len(per) - limit), other=other)
