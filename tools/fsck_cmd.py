"""`replfs fsck DIR [--repair]`: check one local array's filesystem (unmounted).
Exit 0 when clean (or fully repaired), 1 when problems remain."""

from __future__ import annotations

import json

import trio



def register(sub) -> None:
    p = sub.add_parser("fsck", help="check (and repair) the filesystem in DIR")
    p.add_argument("dir")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_fsck)


def cmd_fsck(args) -> int:
    from replfs.fs.fsck import fsck
    from replfs.fs.mkfs import open_fs
    from replfs.raid import open_array

    async def go():
        array = open_array(args.dir)
        try:
            fs = await open_fs(array)
            try:
                rep = await fsck(fs, repair=args.repair)
                again = await fsck(fs) if args.repair and rep.problems else rep
            finally:
                await fs.close()
        finally:
            array.close()
        return rep, again

    rep, again = trio.run(go)
    if args.json:
        print(json.dumps(dict(clean=again.clean, problems=rep.problems, repaired=rep.repaired,
                              remaining=again.problems, inodes=rep.inodes,
                              directories=rep.directories, blocks_used=rep.blocks_used)))
    else:
        for p in rep.problems:
            print(f"problem: {p}")
        for r in rep.repaired:
            print(f"repaired: {r}")
        state = "clean" if again.clean else f"{len(again.problems)} problems remain"
        if rep.problems and again.clean:
            state = "repaired, now clean"
        print(f"replfs fsck {args.dir}: {rep.inodes} inodes, {rep.directories} directories, "
              f"{rep.blocks_used} blocks in use: {state}")
        if not again.clean and not args.repair:
            print("run `replfs fsck --repair DIR` to fix them")
    return 0 if again.clean else 1
