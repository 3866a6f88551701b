"""The rest of a lost file's path, asked of the other groups.

`fs/owners.py` builds a path from its own group's directory entries; it stops at a
directory whose name another group keeps ("…/b/f", `from_dir` D, `from_parent` P). Here
the primaries of the other groups are asked, with the operations a mount uses
(`readdir` of P to find the entry naming D, `dir_info` of P for its parent), up to
group 0's root. Bounded: at most MAX_ENTRIES directory entries listed per path, so a
huge directory leaves the path as it was.
"""

from __future__ import annotations

from replfs.fs.layout import ROOT_SLOT, ino_group, make_ino

MAX_DEPTH = 64
MAX_ENTRIES = 20000
ROOT = make_ino(0, ROOT_SLOT)


async def _name_in(peer, parent: int, child: int, budget: list[int]) -> str | None:
    """The name `parent` gives `child`, or None (not found within the budget)."""
    start = 0
    while budget[0] > 0:
        batch = await peer.call_group(ino_group(parent), "readdir", parent, start, 256)
        if not batch:
            return None
        budget[0] -= len(batch)
        for name, attr, _nxt in batch:
            if (attr if type(attr) is int else attr.ino) == child:
                return name.decode(errors="replace") if isinstance(name, bytes) else name
        start = batch[-1][2]
    return None


async def complete_path(peer, path: str, d: int, parent: int) -> str | None:
    """`path` ("…/rest") with the names of directory `d` (whose parent is `parent`) and
    of its ancestors put in front, up to the root; None if they could not all be found."""
    parts: list[str] = []
    budget = [MAX_ENTRIES]
    for _ in range(MAX_DEPTH):
        name = await _name_in(peer, parent, d, budget)
        if name is None:
            return None
        parts.append(name)
        if parent == ROOT:
            rest = path.removeprefix("…/")
            return "/" + "/".join(reversed(parts)) + ("/" + rest if rest else "")
        info = await peer.call_group(ino_group(parent), "dir_info", parent)
        d, parent = parent, info["parent"]
    return None
