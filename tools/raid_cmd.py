"""`replfs raid create|status|scrub|rebuild|read|write`: the array from the shell.

`read`/`write` give raw access to the logical space, as `dd` on /dev/md0 does.
`status` never opens the array for writing: it reads the superblocks and the state file,
so it works while another process holds the array and changes nothing.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table

from replfs.errors import ReplfsError
from replfs.raid import BlockIOError, create_array, inspect_array, open_array, parse_size


def _size(text: str) -> int:
    return parse_size(text)


def _offset(text: str) -> int:
    if str(text).strip() in ("0", "0B"):
        return 0
    return parse_size(text)


@contextmanager
def _opened(args):
    arr = open_array(args.dir, force=getattr(args, "force", False))
    try:
        for n in arr.notices:
            print(f"replfs raid: {n}", file=sys.stderr)
        yield arr
    except BlockIOError as exc:
        raise ReplfsError(f"I/O error: {exc.strerror}", exit_code=4) from None
    finally:
        arr.close()


def _progress(console: Console, label: str):
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), TaskProgressColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


def cmd_create(args) -> int:
    if args.disks < 3:
        raise ReplfsError(f"--disks {args.disks}: RAID-5 needs at least 3 disks")
    size = _size(args.size)
    chunk = _size(args.chunk)
    paths = args.disk_paths.split(",") if args.disk_paths else None
    arr = create_array(args.dir, args.disks, size, chunk=chunk, disks=paths)
    try:
        st = arr.status()
    finally:
        arr.close()
    print(f"created RAID-5 array {st['uuid']} in {args.dir}: {args.disks} disks of {size} "
          f"bytes, chunk {chunk}, {st['size_bytes']} bytes usable ({st['nblocks']} blocks)")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _online(args):
    """(cluster config, server) when DIR is a running server's array (or `--server`),
    else None; options that only a running server takes are refused for an offline
    array."""
    from replfs.tools import raid_online
    where = raid_online.target(args)
    if where is None:
        for opt in ("speed_min", "speed_max"):
            if getattr(args, opt, None) is not None:
                raise ReplfsError(f"--{opt.replace('_', '-')} paces a rebuild or scrub in a "
                                  f"running server: give the cluster and --server S (an "
                                  f"array opened here is rebuilt at full speed)")
    return where


def _speed(text: str | None) -> int | None:
    """'50M' -> bytes per second; '0' means no limit."""
    return None if text is None else 0 if str(text).strip() == "0" else parse_size(text)


def cmd_status(args) -> int:
    # DIR/S of a running server stays the superblocks' view (read-only, as before);
    # --server asks the server itself
    where = _online(args) if args.server else None
    if where is not None:
        return _status_online(args, *where)
    st = inspect_array(args.dir)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st["health"] != "failed" else 3
    console = Console()
    colour = {"healthy": "green", "degraded": "yellow", "rebuilding": "yellow",
              "failed": "red"}[st["health"]]
    console.print(f"array [bold]{st['dir']}[/] ({st['uuid']}): [{colour}]{st['health']}[/], "
                  f"{st['ndisks']} disks, chunk {_human(st['chunk'])}, "
                  f"{_human(st['size_bytes'])} usable, events {st['events']}, "
                  f"{'clean' if st['clean'] else 'open or not shut down cleanly'}")
    t = Table()
    for col in ("disk", "path", "state", "read err", "write err", "cksum repaired",
                "unrecoverable", "note"):
        t.add_column(col, justify="right" if "err" in col or col in (
            "disk", "cksum repaired", "unrecoverable") else "left")
    for d in st["disks"]:
        note = d["problem"]
        if "rebuild_progress" in d:
            note = f"rebuilt {d['rebuild_progress']:.1%}" + (f"; {note}" if note else "")
        sc = {"active": "green", "rebuilding": "yellow"}.get(d["state"], "red")
        t.add_row(str(d["index"]), d["path"], f"[{sc}]{d['state']}[/]", str(d["read_errors"]),
                  str(d["write_errors"]), str(d["cksum_errors"]), str(d["unrecoverable"]), note)
    console.print(t)
    sc = st.get("scrub")
    if sc:
        if sc.get("state") == "running":
            console.print(f"scrub: running, {sc['row']}/{sc['rows']} rows")
        else:
            f = sc.get("found", {})
            console.print(f"last scrub: {f.get('blocks_checked', 0)} blocks checked, "
                          f"{sum(f.get('cksum_repaired', {}).values())} checksum errors "
                          f"repaired, {f.get('parity_repaired', 0)} parity blocks rewritten, "
                          f"{f.get('unrecoverable', 0)} unrecoverable")
    for n in st["notices"]:
        console.print(f"[yellow]{n}")
    return 0 if st["health"] != "failed" else 3


def _status_online(args, cfg, server) -> int:
    from replfs.tools import raid_online
    info = raid_online.ask(cfg, server, "status")
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0 if info["array"]["health"] != "failed" else 3
    a = info["array"]
    print(f"{server}: array {a['dir']}: {a['health']}, {a['ndisks']} disks")
    for d in a["disks"]:
        note = d["problem"]
        if "rebuild_progress" in d:
            note = f"rebuilt {d['rebuild_progress']:.1%}" + (f"; {note}" if note else "")
        print(f"  disk {d['index']} ({d['path']}): {d['state']}, {d['cksum_errors']} checksum "
              f"errors repaired, {d['unrecoverable']} unrecoverable{'; ' + note if note else ''}")
    print(f"  {raid_online.job_line(info.get('job'))}")
    return 0 if a["health"] != "failed" else 3


def _start_online(args, cfg, server, action: str, **params) -> int:
    from replfs.tools import raid_online
    info = raid_online.ask(cfg, server, action, speed_min=_speed(args.speed_min),
                           speed_max=_speed(args.speed_max), **params)
    print(f"{server}: {raid_online.job_line(info.get('job'))}", file=sys.stderr)
    if args.no_wait:
        return 0
    return raid_online.finished(server, raid_online.wait(cfg, server, action))


def cmd_control(args) -> int:
    """pause | resume | cancel | speed: steer a running server's rebuild or scrub."""
    from replfs.tools import raid_online
    where = raid_online.target(args)
    if where is None:
        raise ReplfsError(f"{args.dir} is not held by a running server: `raid {args.raid}` "
                          f"steers a running server's rebuild or scrub (give the cluster "
                          f"and --server S)")
    cfg, server = where
    params = {}
    if args.raid == "speed":
        if args.speed_min is None and args.speed_max is None:
            raise ReplfsError("give --speed-min and/or --speed-max (e.g. 50M; 0: no limit)")
        params = dict(speed_min=_speed(args.speed_min), speed_max=_speed(args.speed_max))
    info = raid_online.ask(cfg, server, args.raid, **params)
    print(f"{server}: {raid_online.job_line(info.get('job'))}")
    return 0


def cmd_scrub(args) -> int:
    where = _online(args)
    if where is not None:
        return _start_online(args, *where, "scrub")
    console = Console(stderr=True)
    with _opened(args) as arr:
        total = arr.geo.rows
        with _progress(console, "scrub") as prog:
            task = prog.add_task("scrub", total=total * arr.geo.chunk * arr.geo.ndisks)
            found = arr.scrub(progress=lambda done, tot: prog.update(
                task, completed=done * arr.geo.chunk * arr.geo.ndisks))
        repaired = found["cksum_repaired"]
        print(f"scrub of {args.dir}: {found['blocks_checked']} blocks checked")
        if repaired:
            for disk, n in sorted(repaired.items()):
                print(f"  disk {disk}: {n} checksum errors repaired")
        else:
            print("  no checksum errors")
        print(f"  parity mismatches: {found['parity_mismatches']} "
              f"({found['parity_repaired']} rewritten)")
        if found["skipped_disks"]:
            print(f"  not checked (not active): disks {found['skipped_disks']}")
        if found["unrecoverable"]:
            print(f"  UNRECOVERABLE blocks: {found['unrecoverable']} (reads of them fail with "
                  f"EIO; scrub the array while its server runs, `replfs raid scrub CLUSTER "
                  f"--server S`, to heal them from the other replica)")
            return 1
    return 0


def cmd_rebuild(args) -> int:
    where = _online(args)
    if where is not None:
        image = os.path.abspath(args.image) if args.image else None
        return _start_online(args, *where, "rebuild", disk=args.disk, image=image)
    console = Console(stderr=True)
    with _opened(args) as arr:
        geo = arr.geo
        arr.member(args.disk)  # a bad index is an error before any progress bar
        with _progress(console, f"rebuild disk {args.disk}") as prog:
            task = prog.add_task("rebuild", total=geo.rows * geo.chunk)
            res = arr.rebuild(args.disk, image=args.image,
                              progress=lambda done, tot: prog.update(
                                  task, completed=done * geo.chunk))
    print(f"disk {res['disk']} rebuilt onto {res['path']}: {_human(res['bytes'])} in "
          f"{res['seconds']:.1f} s")
    if res["lost_blocks"]:
        print(f"  {res['lost_blocks']} blocks could not be rebuilt (damaged on another disk "
              f"too); reads of them fail with EIO")
        return 1
    return 0


def cmd_read(args) -> int:
    offset = _offset(args.offset)
    length = _size(args.length) if args.length else None
    with _opened(args) as arr:
        end = arr.nblocks * arr.block_size
        if length is None:
            length = end - offset
        out = sys.stdout.buffer
        pos = 0
        step = 4 << 20
        while pos < length:
            n = min(step, length - pos)
            out.write(arr.read_bytes_sync(offset + pos, n))
            pos += n
        out.flush()
    return 0


def cmd_write(args) -> int:
    offset = _offset(args.offset)
    with _opened(args) as arr:
        end = arr.nblocks * arr.block_size
        inp = sys.stdin.buffer
        pos = 0
        step = 4 << 20
        while True:
            data = inp.read(step)
            if not data:
                break
            if offset + pos + len(data) > end:
                raise ReplfsError(f"input runs past the end of the array ({end} bytes) at "
                                  f"offset {offset + pos + len(data)}; {pos} bytes were "
                                  f"written before it")
            arr.write_bytes_sync(offset + pos, data)
            pos += len(data)
        arr.flush_sync()
    print(f"wrote {pos} bytes at offset {offset}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("raid", help="create, inspect, scrub, rebuild and access a RAID-5 array")
    rsub = p.add_subparsers(dest="raid", metavar="ACTION")
    rsub.required = True

    c = rsub.add_parser("create", help="create an array of N image files in DIR")
    c.add_argument("dir")
    c.add_argument("--disks", type=int, required=True, help="number of disks (>= 3)")
    c.add_argument("--size", required=True, help="size of each disk, e.g. 64M")
    c.add_argument("--chunk", default="64K", help="chunk size (default 64K)")
    c.add_argument("--disk-paths", help="comma-separated member paths (e.g. /dev/loop0,...) "
                                        "instead of DIR/disk<i>.img")
    c.set_defaults(func=cmd_create)

    s = rsub.add_parser("status", help="show each disk's state and counters")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    _server_arg(s, implied=False)
    s.set_defaults(func=cmd_status)

    for name, func, helptext in (("scrub", cmd_scrub, "verify checksums and parity, repair"),
                                 ("rebuild", cmd_rebuild, "rebuild a failed or new disk")):
        q = rsub.add_parser(name, help=helptext)
        q.add_argument("dir")
        if name == "rebuild":
            q.add_argument("--disk", type=int, required=True, help="member index to rebuild")
            q.add_argument("--image", help="rebuild onto this new image (replaces the member)")
        q.add_argument("--force", action="store_true",
                       help="start a dirty degraded array (see open_array)")
        _server_arg(q)
        _speed_args(q)
        q.add_argument("--no-wait", action="store_true",
                       help="with a running server: start it and return at once")
        q.set_defaults(func=func)

    for name, helptext in (("pause", "pause a running server's rebuild or scrub"),
                           ("resume", "resume a paused rebuild or scrub"),
                           ("cancel", "stop a rebuild (it keeps its position) or scrub"),
                           ("speed", "change the speed limits of a rebuild or scrub")):
        q = rsub.add_parser(name, help=helptext)
        q.add_argument("dir", help="the cluster directory (with --server), or DIR/S")
        _server_arg(q)
        if name == "speed":
            _speed_args(q)
        q.set_defaults(func=cmd_control)

    r = rsub.add_parser("read", help="read the logical space to stdout")
    r.add_argument("dir")
    r.add_argument("--offset", default="0")
    r.add_argument("--length", help="bytes (default: to the end)")
    r.add_argument("--force", action="store_true")
    r.set_defaults(func=cmd_read)

    w = rsub.add_parser("write", help="write stdin into the logical space")
    w.add_argument("dir")
    w.add_argument("--offset", default="0")
    w.add_argument("--force", action="store_true")
    w.set_defaults(func=cmd_write)


def _server_arg(p, implied: bool = True) -> None:
    p.add_argument("--server", help="act through this running server of the cluster DIR "
                                    "(while it serves)" + ("; also implied by DIR/S of a "
                                                           "running server" if implied else ""))


def _speed_args(p) -> None:
    p.add_argument("--speed-min", help="bytes/s per disk while the array serves I/O "
                                       "(default 32M; 0: no limit)")
    p.add_argument("--speed-max", help="bytes/s per disk when it is idle (default 0: no "
                                       "limit)")
