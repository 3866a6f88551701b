"""The plans of two-phase commit (replication/twopc.py, step 1): from ordinary
committed reads in every group (`FileSystem.entry`, `dir_info`, `getattr`), the steps
each group runs for a rename, link, unlink, rmdir or mkdir that spans groups (fs/parts.py
`_step`); each step re-checks, under its locks, what the plan assumed.

`Planner` is a mixin of `TwoPhase`: it uses its server (`self.s`) and its client of the
other groups (`self.peer`).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Callable

from replfs.fs import directory
from replfs.fs.core import RENAME_EXCHANGE, RENAME_NOREPLACE, Attr
from replfs.fs.errors import FsError
from replfs.fs.layout import S_IFDIR, S_IFMT, ino_group

DIR_T = S_IFDIR >> 12
ROOT = 1


@dataclass
class Plan:
    remote: dict[int, list]                         # group -> steps
    local: Callable[[dict], list]                   # remote results -> the coordinator's steps
    result: Callable[[dict, list], Any] = lambda remote, local: None


@dataclass
class Done:
    value: Any = None


def _type(mode: int) -> int:
    return (mode & S_IFMT) >> 12


class Planner:
    """How `TwoPhase` plans each distributed operation (a mixin)."""

    # ------------------------------------------------------------ reads for planning
    async def _read(self, group: int, method: str, *args):
        if group == self.s.group:
            return await getattr(self.s.fs, method)(*args)
        return await self.peer.call_group(group, method, *args)

    async def _entry(self, parent: int, name: bytes):
        return await self._read(ino_group(parent), "entry", parent, name)

    async def _getattr(self, ino: int) -> Attr:
        return await self._read(ino_group(ino), "getattr", ino)

    # ------------------------------------------------------------ plans
    async def _plan_rename(self, p_old, n_old, p_new, n_new, flags=0, optimistic=False):
        """`optimistic`: take the new name as free if its directory is another group's
        (one round trip less; the step that links it checks, under its lock)."""
        if flags & RENAME_EXCHANGE:
            return await self._plan_exchange(p_old, n_old, p_new, n_new)
        directory.check_name(n_new)
        src = await self._entry(p_old, n_old)
        if src is None:
            raise FsError(errno.ENOENT, n_old.decode(errors="replace"))
        sino, styp = src
        s_dir = styp == DIR_T
        if optimistic and ino_group(p_new) != self.s.group:
            dst = None
        else:
            dst = await self._entry(p_new, n_new)
        d_dir = False
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST, n_new.decode(errors="replace"))
            if dst[0] == sino:
                return Done()
            d_dir = dst[1] == DIR_T
            if s_dir and not d_dir:
                raise FsError(errno.ENOTDIR, n_new.decode(errors="replace"))
            if not s_dir and d_dir:
                raise FsError(errno.EISDIR, n_new.decode(errors="replace"))
        moved = s_dir and p_old != p_new
        chain = await self._chain(sino, p_new) if moved else []
        steps: dict[int, list] = {}

        def add(ino, step):
            steps.setdefault(ino_group(ino), []).append(step)
        add(p_old, ["unlink_entry", p_old, n_old, sino, -1 if moved else 0])
        add(p_new, ["link_entry", p_new, n_new, sino, styp, dst[0] if dst else 0,
                    (1 if moved else 0) - (1 if d_dir else 0)])
        add(sino, ["move_child", sino, s_dir, p_old if moved else 0, p_new if moved else 0])
        if dst is not None:
            add(dst[0], ["drop_link", dst[0], d_dir])
        for d, parent in chain:
            add(d, ["expect_parent", d, parent])
        return self._split(steps)

    async def _plan_exchange(self, p_old, n_old, p_new, n_new):
        a = await self._entry(p_old, n_old)
        b = await self._entry(p_new, n_new)
        if a is None or b is None:
            raise FsError(errno.ENOENT, (n_old if a is None else n_new).decode(errors="replace"))
        if a[0] == b[0]:
            return Done()
        a_dir, b_dir = a[1] == DIR_T, b[1] == DIR_T
        cross = p_old != p_new
        chain = []
        if cross and a_dir:
            chain += await self._chain(a[0], p_new)
        if cross and b_dir:
            chain += await self._chain(b[0], p_old)
        delta_old = (b_dir - a_dir) if cross else 0
        steps: dict[int, list] = {}

        def add(ino, step):
            steps.setdefault(ino_group(ino), []).append(step)
        add(p_old, ["link_entry", p_old, n_old, b[0], b[1], a[0], delta_old])
        add(p_new, ["link_entry", p_new, n_new, a[0], a[1], b[0], -delta_old])
        add(a[0], ["move_child", a[0], a_dir, p_old if cross and a_dir else 0,
                   p_new if cross and a_dir else 0])
        add(b[0], ["move_child", b[0], b_dir, p_new if cross and b_dir else 0,
                   p_old if cross and b_dir else 0])
        for d, parent in chain:
            add(d, ["expect_parent", d, parent])
        return self._split(steps)

    async def _chain(self, moving: int, start: int) -> list:
        """The ancestors of `start` up to the root as (dir, parent) pairs; EINVAL if
        `moving` is one of them (a directory cannot move into its own subtree)."""
        chain = []
        cur = start
        while True:
            if cur == moving:
                raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
            if cur == ROOT:
                return chain
            info = await self._read(ino_group(cur), "dir_info", cur)
            chain.append((cur, info["parent"]))
            cur = info["parent"]
            if len(chain) > 100000:
                raise FsError(errno.EIO, "directory parent chain is broken (run fsck)")

    async def _plan_unlink(self, parent, name, keep=None):
        # `keep` (the client's open inodes) does not matter here: the inode lives in
        # another group, which frees it at the client's `forget`
        ent = await self._entry(parent, name)
        if ent is None:
            raise FsError(errno.ENOENT, name.decode(errors="replace"))
        if ent[1] == DIR_T:
            raise FsError(errno.EISDIR, "use rmdir for directories")
        return self._split({ino_group(parent): [["unlink_entry", parent, name, ent[0], 0]],
                            ino_group(ent[0]): [["drop_link", ent[0], False]]})

    async def _plan_rmdir(self, parent, name):
        if name == b".":
            raise FsError(errno.EINVAL, "cannot remove '.'")
        if name == b"..":
            raise FsError(errno.ENOTEMPTY, "cannot remove '..'")
        ent = await self._entry(parent, name)
        if ent is None:
            raise FsError(errno.ENOENT, name.decode(errors="replace"))
        if ent[1] != DIR_T:
            raise FsError(errno.ENOTDIR, name.decode(errors="replace"))
        return self._split({ino_group(parent): [["unlink_entry", parent, name, ent[0], -1]],
                            ino_group(ent[0]): [["drop_link", ent[0], True]]})

    async def _plan_link(self, ino, parent, name):
        directory.check_name(name)
        if await self._entry(parent, name) is not None:
            raise FsError(errno.EEXIST, name.decode(errors="replace"))
        attr = await self._getattr(ino)
        g = ino_group(ino)
        typ = _type(attr.mode)
        return Plan({g: [["add_link", ino]]},
                    lambda remote: [["link_entry", parent, name, ino, typ, 0, 0]],
                    lambda remote, local: remote[g][0])

    async def _plan_mkdir(self, parent, name, mode, uid, gid, *, group=None):
        directory.check_name(name)
        info = await self.s.fs.dir_info(parent)
        if await self._entry(parent, name) is not None:
            raise FsError(errno.EEXIST, name.decode(errors="replace"))
        mode = mode & 0o7777
        if info["mode"] & 0o2000:       # setgid directory: the new one inherits its group
            gid = info["gid"]
            mode |= 0o2000
        g = group

        def local(remote):
            return [["link_entry", parent, name, remote[g][0].ino, DIR_T, 0, 1]]
        return Plan({g: [["new_dir", parent, mode, uid, gid]]}, local,
                    lambda remote, loc: remote[g][0])

    def _split(self, steps: dict[int, list]) -> Plan:
        mine = steps.pop(self.s.group, [])
        return Plan(steps, lambda remote: mine)
