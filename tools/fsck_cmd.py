"""`replfs fsck DIR [--repair] [--json]`: check a stopped cluster, or one array.

DIR is either a cluster directory (it holds `cluster.json`) or one array's directory.

A cluster is checked whole, in two passes: first each replica alone, for the entries
that name other groups' inodes (used only if the replicas of each group agree on them:
otherwise, and while transactions are in doubt, every group is checked alone); then
every replica of every group with the names that the other groups give its inodes
(`fsck(..., external=...)`, see fs/fsck.py). Every array is opened (and so locked) before
anything is read: a running server holds its array, and fsck then refuses to start.
`--repair` first removes, in every replica of the naming group, the entries that name an
inode which no replica of its group has, then repairs every replica on its own.

One array: a filesystem of group 0 that is not a cluster's replica is the whole
namespace and is checked as such; a cluster replica checked alone cannot see the names
other groups give its inodes (the report says what that leaves unchecked).

Exit 0 when everything is clean (or repaired), 1 when problems remain.
"""

from __future__ import annotations

import json
import os

import trio

from replfs.errors import ReplfsError


def register(sub) -> None:
    p = sub.add_parser("fsck", help="check (and repair) the filesystems of a stopped cluster "
                                    "in DIR, or of one array in DIR")
    p.add_argument("dir")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_fsck)


def cmd_fsck(args) -> int:
    from replfs.replication.config import CONFIG
    if os.path.exists(os.path.join(args.dir, CONFIG)):
        return _cluster(args)
    return _array(args)


# ------------------------------------------------------------------ one array

def _array(args) -> int:
    from replfs.fs.fsck import fsck
    from replfs.fs.mkfs import open_fs
    from replfs.raid import open_array
    from replfs.replication.config import CONFIG

    parent = os.path.dirname(os.path.abspath(args.dir))
    replica = os.path.exists(os.path.join(parent, CONFIG))

    async def go():
        array = open_array(args.dir)
        try:
            # no orphan reclaim: fsck checks what it finds (and a lock held by a
            # transaction in doubt would make the reclaim wait)
            fs = await open_fs(array, reclaim=False)
            try:
                external = [] if fs.sb.group == 0 and not replica else None
                rep = await fsck(fs, repair=args.repair, external=external)
                again = rep
                if args.repair and rep.problems and rep.scanned:
                    again = await fsck(fs, external=external)
            finally:
                await fs.close()
        finally:
            array.close()
        return rep, again

    rep, again = trio.run(go)
    if replica:
        rep.notes.append(f"{args.dir} is a replica of the cluster in {parent}: "
                         f"`replfs fsck {parent}` checks the names between groups too")
    if args.json:
        print(json.dumps(dict(rep.to_json(), clean=again.clean, remaining=again.problems)))
    else:
        _print_one("", rep, again, args.repair)
        print(f"replfs fsck {args.dir}: {_summary(rep, again)}")
        if not again.clean and not args.repair:
            print(f"run `replfs fsck --repair {args.dir}` to fix them")
    return 0 if again.clean else 1


def _summary(rep, again) -> str:
    if not rep.scanned:
        state = "not checked"
    elif again.clean:
        state = "repaired, now clean" if rep.problems else "clean"
    else:
        state = _remain(len(again.problems))
    return (f"{rep.inodes} inodes, {rep.directories} directories, {rep.blocks_used} "
            f"blocks in use: {state}")


def _remain(n: int) -> str:
    return "1 problem remains" if n == 1 else f"{n} problems remain"


def _print_one(label: str, rep, again, repair: bool) -> None:
    for p in rep.problems:
        print(f"{label}problem: {p}")
    for r in rep.repaired:
        print(f"{label}repaired: {r}")
    if repair and again is not rep:
        for p in again.problems:
            print(f"{label}remains: {p}")
    for n in rep.notes:
        print(f"{label}note: {n}")


# ------------------------------------------------------------------ a cluster

class _Replica:
    def __init__(self, server: str, group: int):
        self.server = server
        self.group = group
        self.array = None
        self.error: str | None = None
        self.rep = None          # the check with external names (pass 2)
        self.final = None        # after --repair: the check again
        self.repaired: list[str] = []


def _cluster(args) -> int:
    from replfs.raid import RaidError, open_array
    from replfs.replication.config import ClusterConfig

    cfg = ClusterConfig.load(args.dir)
    replicas = [_Replica(s, g) for g in sorted(cfg.groups) for s in cfg.groups[g]]
    try:
        for r in replicas:
            try:
                r.array = open_array(cfg.server_dir(r.server))
            except RaidError as exc:
                if "in use by another process" in str(exc):
                    raise ReplfsError(f"{exc} (the cluster in {args.dir} looks running: "
                                      f"`replfs down {args.dir}` stops it)") from None
                r.error = f"its array cannot be opened: {exc}"
        problems = trio.run(_check_cluster, cfg, replicas, args.repair)
    finally:
        for r in replicas:
            if r.array is not None:
                r.array.close()
    clean = not problems and all(r.error is None and r.final.clean for r in replicas)
    if args.json:
        out = dict(clean=clean, problems=problems, replicas={})
        for r in replicas:
            d = dict(group=r.group, error=r.error)
            if r.rep is not None:
                d.update(r.rep.to_json(), repaired=r.repaired + r.rep.repaired,
                         clean=r.final.clean, remaining=r.final.problems)
            out["replicas"][r.server] = d
        print(json.dumps(out))
    else:
        for r in replicas:
            label = f"{r.server} (group {r.group}): "
            if r.error is not None:
                print(f"{label}problem: {r.error}")
                continue
            for x in r.repaired:
                print(f"{label}repaired: {x}")
            _print_one(label, r.rep, r.final, args.repair)
            print(f"{label}{_summary(r.rep, r.final)}")
        for p in problems:
            print(f"cluster: problem: {p}")
        n = sum(len(r.final.problems) if r.final else 1 for r in replicas) + len(problems)
        print(f"replfs fsck {args.dir}: {len(replicas)} replicas in {len(cfg.groups)} groups: "
              + ("clean" if clean else _remain(n)))
        if not clean and not args.repair:
            print(f"run `replfs fsck --repair {args.dir}` to fix what can be fixed")
    return 0 if clean else 1


async def _check_cluster(cfg, replicas, repair: bool):
    from replfs.fs.fsck import fmt, fsck, incoming, remove_entries
    from replfs.fs.layout import ino_group

    problems: list[str] = []
    by_group: dict[int, list[_Replica]] = {}
    for r in replicas:
        by_group.setdefault(r.group, []).append(r)

    async def with_fs(r, fn):
        from replfs.fs.mkfs import open_fs
        try:
            fs = await open_fs(r.array, reclaim=False)
        except (ReplfsError, OSError) as exc:
            r.error = f"its filesystem cannot be opened: {exc}"
            return None
        try:
            if fs.sb.group != r.group:
                r.error = (f"its filesystem is group {fs.sb.group}'s, but cluster.json puts "
                           f"it in group {r.group}")
                return None
            return await fn(fs)
        except (ReplfsError, OSError) as exc:     # e.g. blocks that RAID cannot rebuild
            r.error = f"its filesystem cannot be read: {exc}"
            return None
        finally:
            await fs.close()

    # pass 1: every replica alone, for the names each group gives other groups' inodes.
    # Those are used only if every readable replica of the group was scanned and all
    # agree: names from a replica that was behind would make right link counts look
    # wrong (and --repair "fix" them).
    alone = {}
    for g, rs in sorted(by_group.items()):
        reps = {}
        for r in rs:
            if r.error is None:
                rep = await with_fs(r, fsck)
                if rep is not None:
                    reps[r.server] = rep
        if not reps:
            problems.append(f"no replica of group {g} could be read: the names it gives "
                            "other groups' inodes are unknown, so every group was checked "
                            "alone")
        elif not all(rep.scanned for rep in reps.values()):
            problems.append(f"group {g} has transactions in doubt: the names it gives other "
                            "groups' inodes are not settled, so every group was checked alone")
        elif len({frozenset(rep.outgoing) for rep in reps.values()}) > 1:
            counts = ", ".join(f"{s}: {len(rep.outgoing)}" for s, rep in reps.items())
            problems.append(f"the replicas of group {g} differ in the entries that name other "
                            f"groups' inodes ({counts}), so every group was checked alone: "
                            "was a backup behind when the cluster stopped? start the cluster "
                            "so that it catches up, stop it and check again")
        else:
            alone[g] = next(iter(reps.values()))
    for rep in alone.values():
        for d, name, ino, _t in rep.outgoing:
            if ino_group(ino) not in cfg.groups:
                problems.append(f"entry {name!r} in directory {fmt(d)} (group {rep.group}) "
                                f"names inode {fmt(ino)} of group {ino_group(ino)}, which "
                                "this cluster does not have")
    complete = len(alone) == len(by_group)

    def external(g):
        return incoming(g, alone.values()) if complete else None

    # pass 2: every replica, with what the other groups name
    for r in replicas:
        if r.error is None:
            r.rep = await with_fs(r, lambda fs, g=r.group: fsck(fs, external=external(g)))
    if not repair:
        for r in replicas:
            r.final = r.rep
        return problems

    # repair 1: entries naming an inode that no replica of its group has (before any
    # repair allocates an inode that such an entry would then name)
    if complete:
        dangling: dict[tuple, int] = {}
        for g, rs in by_group.items():
            if all(r.rep is not None and r.rep.scanned for r in rs):
                sets = [set(r.rep.dangling_incoming) for r in rs]
                for e in set.intersection(*sets):
                    dangling[e] = g
        for h, rs in sorted(by_group.items()):
            mine = [e for e in dangling if ino_group(e[0]) == h]
            if not mine:
                continue
            for r in rs:
                if r.error is None:
                    r.repaired += await with_fs(r, lambda fs: remove_entries(fs, mine)) or []
            alone[h].outgoing = [e for e in alone[h].outgoing if e not in dangling]

    # repair 2: every replica on its own, then the check again
    for r in replicas:
        if r.error is None and r.rep is not None:
            async def fix(fs, g=r.group):
                rep = await fsck(fs, repair=True, external=external(g))
                again = await fsck(fs, external=external(g)) if rep.problems and rep.scanned \
                    else rep
                return rep, again
            got = await with_fs(r, fix)
            if got is not None:
                r.rep, r.final = got
    for r in replicas:
        if r.final is None and r.error is None:
            r.final = r.rep
    return problems
