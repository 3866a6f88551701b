"""`replfs bench fs`: the same workloads, in the same run on the same disk, on

- a minimal pyfuse3 passthrough filesystem (the floor any Python FUSE filesystem pays),
- a local replfs mount (`replfs mount --local`: one array, no replication),
- a replicated replfs mount as `replfs up` makes it: a real cluster of two replica groups,
  each a primary/backup pair, with directories spread over the groups by a hash of their
  name.

All three are mounted at once, and every workload runs in rounds, every mount once per
round (in a rotating order), so that a noisy minute on a shared machine hits each of
them; the table gives the median of the rounds. The goals (issue 10) are for the
replicated mount against the passthrough measured in the same run; the local mount's
figures are there for information. On the replicated mount, renames between two
directories of the same group are compared with renames between directories of
different groups (two-phase commit), interleaved in small batches.

The sequential read reads the file just written (and fsync'd) through a new open, as
`cat` would right after `cp`: on every mount alike, nothing is dropped by hand, so
whatever the mount lets the kernel keep in its page cache counts. (Without FUSE's
writeback cache the kernel drops the pages a write left once it sees the file's new
mtime, so this read reaches the filesystem.) The re-read then reads the unchanged file
once more through another new open: what a page cache kept across opens gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path

from replfs.raid import parse_size
from replfs.replication.config import place_by_name
from replfs.tools.mountpoints import unmount, wait_mounted

MiB = 1 << 20
GROUP_SHIFT = 48            # an inode number's group: st_ino >> 48
BATCH = 25                  # same-group / cross-group renames alternate in batches of this

PT, LOCAL, REPL = "passthrough", "local", "replicated"

SEQ_W = "seq write + fsync (MB/s)"
SEQ_R = "seq read (MB/s)"
SEQ_RR = "seq re-read (MB/s)"
CREATE = "create 4 KiB (ops/s)"
STAT = "stat (ops/s)"
READDIR = "readdir (entries/s)"
RENAME = "rename across dirs (ops/s)"
UNLINK = "unlink (ops/s)"
FSYNC = "fsync latency (ms, median)"
SAME = "rename same group (ops/s)"
CROSS = "rename across groups (ops/s)"
CROSS_RATIO = "rename across/same group"
ROWS = [SEQ_W, SEQ_R, SEQ_RR, CREATE, STAT, READDIR, RENAME, UNLINK, FSYNC, SAME, CROSS]
RATIOS = [CROSS_RATIO]      # already ratios (the median of each round's)

# issue 10: the replicated mount against the passthrough, as speed ratios (> 1: faster)
GOALS = {CREATE: 0.4, RENAME: 0.2, UNLINK: 0.35, STAT: 0.3, READDIR: 0.6, SEQ_W: 0.5,
         SEQ_R: 1.0}
GOAL_FSYNC_MS = 1.0         # the replicated mount's fsync p50, absolute
GOAL_CROSS = 0.3            # cross-group / same-group renames on the replicated mount


def register(sub) -> None:
    p = sub.add_parser("fs", help="filesystem workloads: passthrough vs replfs local vs "
                                  "replicated")
    p.add_argument("--size", default="128M", help="sequential file size (default 128M)")
    p.add_argument("--files", type=int, default=2000,
                   help="small files per round on the passthrough and local mounts "
                        "(default 2000)")
    p.add_argument("--replicated-files", type=int, default=500,
                   help="small files per round on the replicated mount (default 500; "
                        "figures are rates)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of the metadata workloads; the median is reported (default 3)")
    p.add_argument("--seq-rounds", type=int, default=3,
                   help="rounds of the sequential write/read, every mount once per round; "
                        "the median is reported (default 3)")
    p.add_argument("--no-replicated", action="store_true",
                   help="skip the replicated cluster")
    p.add_argument("--dir", default=None,
                   help="scratch directory (default: a temp dir in /var/tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (images and logs) afterwards")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.set_defaults(func=cmd_bench_fs)


# ------------------------------------------------------------------ the mounts
def _stop(proc, mnt: Path) -> None:
    try:
        unmount(mnt)
    finally:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        unmount(mnt)


@contextmanager
def replfs_local(base: Path, disk_size: int):
    data, mnt = base / "replfs-data", base / "replfs-mnt"
    mnt.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "replfs.tools.cli", "mkfs", str(data), "--disks", "4",
                    "--size", str(disk_size)], check=True, capture_output=True)
    with open(base / "replfs-mount.log", "wb") as log:
        # its own session: a Ctrl-C reaches only us, and we unmount it cleanly
        proc = subprocess.Popen([sys.executable, "-m", "replfs.tools.cli", "mount", "--local",
                                 str(data), str(mnt)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    try:
        wait_mounted(mnt, lambda: proc.poll() is None,
                     f"the replfs mount (log {base / 'replfs-mount.log'})")
        yield mnt
    finally:
        _stop(proc, mnt)


@contextmanager
def passthrough(base: Path):
    src, mnt = base / "pt-src", base / "pt-mnt"
    src.mkdir(parents=True)
    mnt.mkdir(parents=True)
    with open(base / "passthrough.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "replfs.tools.passthrough", str(src),
                                 str(mnt)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    try:
        wait_mounted(mnt, lambda: proc.poll() is None, "the passthrough mount")
        yield mnt
    finally:
        _stop(proc, mnt)


@contextmanager
def replicated(base: Path, disk_size: int):
    """Two groups of a primary and a backup, directories spread over them by name, with
    everything else as a user gets it from `replfs up`."""
    from replfs.tools.cluster import start_mounted_cluster

    base.mkdir(parents=True, exist_ok=True)
    mnt, _cluster, stop = start_mounted_cluster(str(base), disk_size=disk_size,
                                                placement="spread")
    try:
        yield Path(mnt)
    finally:
        stop()


# ------------------------------------------------------------------ workloads
def _read_all(f: Path) -> int:
    fd = os.open(f, os.O_RDONLY)
    try:
        n = 0
        while chunk := os.read(fd, MiB):
            n += len(chunk)
    finally:
        os.close(fd)
    return n


def seq_workload(mnt: Path, size: int, tag: str = "") -> dict:
    """Write `size` bytes (1 MiB writes), fsync, close; then read the file back through a
    new open, as `cat` would after `cp`, and once more through another. The same on every
    mount: no cache is dropped."""
    out = {}
    buf = os.urandom(MiB)
    f = mnt / f"seq{tag}"
    t = time.perf_counter()
    fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MiB):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    out[SEQ_W] = size / MiB / (time.perf_counter() - t)
    for key in (SEQ_R, SEQ_RR):
        t = time.perf_counter()
        n = _read_all(f)
        out[key] = size / MiB / (time.perf_counter() - t)
        if n != size // MiB * MiB:
            raise AssertionError(f"{f}: read back {n} bytes, wrote {size // MiB * MiB}")
    os.unlink(f)
    return out


def pick_dir_names(round_no: int, groups: int = 2) -> tuple[str, str, str]:
    """Names (a, b, c) for one round's directories such that, with "spread" placement
    over `groups` groups, a and b land in group 0 and c in group 1."""
    def first(prefix: str, group: int) -> str:
        for k in range(10_000):
            name = f"{prefix}{k}"
            if place_by_name(name.encode(), groups) == group:
                return name
        raise AssertionError("no name found")        # pragma: no cover (1 in 2 per try)
    return first(f"r{round_no}-a", 0), first(f"r{round_no}-b", 0), first(f"r{round_no}-c", 1)


def meta_workload(mnt: Path, nfiles: int, round_no: int, groups: bool) -> dict:
    """One round of the metadata workloads on `mnt`; with `groups` (the replicated mount)
    also same-group and cross-group renames. Returns {row: value}."""
    out = {}
    an, bn, cn = pick_dir_names(round_no)
    a, b, c = mnt / an, mnt / bn, mnt / cn
    for d in (a, b, c):
        d.mkdir()
    if groups:
        where = {d.name: os.stat(d).st_ino >> GROUP_SHIFT for d in (a, b, c)}
        if (where[an], where[bn], where[cn]) != (0, 0, 1):
            raise AssertionError(f"directories did not land in groups (0, 0, 1): {where}")
    small = os.urandom(4096)
    names = [f"f{i}" for i in range(nfiles)]

    t = time.perf_counter()
    for n in names:
        fd = os.open(a / n, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, small)
        os.close(fd)
    out[CREATE] = nfiles / (time.perf_counter() - t)

    t = time.perf_counter()
    for n in names:
        os.stat(a / n)
    out[STAT] = nfiles / (time.perf_counter() - t)

    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        got = len(os.listdir(a))
    out[READDIR] = reps * nfiles / (time.perf_counter() - t)
    if got != nfiles:
        raise AssertionError(f"{a}: {got} entries, expected {nfiles}")

    # a -> b: both in group 0 on the replicated mount
    t = time.perf_counter()
    for n in names:
        os.rename(a / n, b / n)
    out[RENAME] = nfiles / (time.perf_counter() - t)

    if groups:
        # in batches, alternately: b -> a (same group), a -> c and c -> b (across groups,
        # both directions), so that noise hits both figures alike; the files end in b
        same_t = cross_t = 0.0
        for i in range(0, nfiles, BATCH):
            batch = names[i:i + BATCH]
            t = time.perf_counter()
            for n in batch:
                os.rename(b / n, a / n)
            same_t += time.perf_counter() - t
            t = time.perf_counter()
            for n in batch:
                os.rename(a / n, c / n)
            for n in batch:
                os.rename(c / n, b / n)
            cross_t += time.perf_counter() - t
        out[SAME] = nfiles / same_t
        out[CROSS] = 2 * nfiles / cross_t
        out[CROSS_RATIO] = out[CROSS] / out[SAME]
        if os.listdir(a) or os.listdir(c) or len(os.listdir(b)) != nfiles:
            raise AssertionError(f"after the renames: {len(os.listdir(a))} in {an}, "
                                 f"{len(os.listdir(b))} in {bn}, {len(os.listdir(c))} in {cn}")

    t = time.perf_counter()
    for n in names:
        os.unlink(b / n)
    out[UNLINK] = nfiles / (time.perf_counter() - t)

    lat = []
    f = mnt / f"sync{round_no}"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(100):
            os.pwrite(fd, small, i * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    out[FSYNC] = statistics.median(lat) * 1000
    os.unlink(f)
    for d in (a, b, c):
        d.rmdir()
    return out


# ------------------------------------------------------------------ reporting
def _median(rounds: list[dict]) -> dict:
    keys = [k for k in ROWS + RATIOS if any(k in r for r in rounds)]
    return {k: statistics.median(r[k] for r in rounds if k in r) for k in keys}


def _speed_ratio(key: str, num: float | None, den: float | None) -> float | None:
    """num relative to den, > 1 meaning num is better (for a latency: den / num)."""
    if num is None or den is None or num == 0 or den == 0:
        return None
    return den / num if "latency" in key else num / den


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _verdict(row: dict) -> str:
    if row["met"] is None:
        return ""
    if row["met"]:
        return "ok"
    if row["workload"] == FSYNC:
        return f"MISS {row[REPL]:.2f} ms of <= {GOAL_FSYNC_MS:g} ms"
    got = row[REPL] if row["workload"] == CROSS_RATIO else row["replicated/passthrough"]
    return f"MISS {got:.2f}x of {row['_goal']:g}x"


def _paired_ratio(k: str, num: str, den: str, medians: dict, per_round: dict | None):
    """Mount `num` against mount `den` for row `k`: the median of each round's ratio (the
    two ran moments apart, so a load that comes and goes between rounds cancels out),
    or, without per-round figures, the ratio of the medians."""
    pairs = list(zip(per_round.get(num, {}).get(k, []),
                     per_round.get(den, {}).get(k, []))) if per_round else []
    ratios = [r for r in (_speed_ratio(k, a, b) for a, b in pairs) if r is not None]
    if ratios:
        return statistics.median(ratios)
    return _speed_ratio(k, medians.get(num, {}).get(k), medians.get(den, {}).get(k))


def per_round_figures(*lists: dict) -> dict:
    """{mount: {row: [value of round 0, round 1, ...]}} from {mount: [round dicts]}."""
    out: dict = {}
    for by_mount in lists:
        for name, rounds in by_mount.items():
            for r in rounds:
                for k, v in r.items():
                    out.setdefault(name, {}).setdefault(k, []).append(v)
    return out


def summarise(medians: dict, per_round: dict | None = None) -> dict:
    """Ratios and goal checks from the per-mount medians (and, when given, the per-round
    figures of `per_round_figures`, which the ratios pair round by round). Each row: the
    three medians, local/passthrough (information), replicated/passthrough (the goal's
    ratio), the goal (text), met (True, False, or None when there is no goal or no
    figure) and verdict ("ok" / "MISS 0.12x of 0.4x" / "")."""
    pt, lo, rp = medians.get(PT, {}), medians.get(LOCAL, {}), medians.get(REPL, {})
    rows = []
    for k in ROWS:
        if k not in pt and k not in lo and k not in rp:
            continue
        rr = _paired_ratio(k, REPL, PT, medians, per_round)
        goal, met, target = "", None, None
        if k in GOALS:
            target = GOALS[k]
            goal = f"repl >= {target:g}x pt"
            met = None if rr is None else rr >= target
        elif k == FSYNC:
            goal = f"repl p50 <= {GOAL_FSYNC_MS:g} ms"
            met = None if rp.get(k) is None else rp[k] <= GOAL_FSYNC_MS
        rows.append({"workload": k, PT: pt.get(k), LOCAL: lo.get(k), REPL: rp.get(k),
                     "local/passthrough": _paired_ratio(k, LOCAL, PT, medians, per_round),
                     "replicated/passthrough": rr, "goal": goal, "met": met,
                     "_goal": target})
    if rp.get(CROSS_RATIO) is not None:
        r = rp[CROSS_RATIO]       # the median of the rounds' ratios (batches interleaved)
        rows.append({"workload": CROSS_RATIO, PT: None, LOCAL: None, REPL: r,
                     "local/passthrough": None, "replicated/passthrough": None,
                     "goal": f"cross >= {GOAL_CROSS:g}x same", "met": r >= GOAL_CROSS,
                     "_goal": GOAL_CROSS})
    for row in rows:
        row["verdict"] = _verdict(row)
    return {"rows": rows}


def print_table(console, summary: dict, title: str, caption: str) -> None:
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("workload")
    table.add_column(PT, justify="right")
    table.add_column(LOCAL, justify="right")
    table.add_column(REPL, justify="right")
    table.add_column("local/pt", justify="right")
    table.add_column("repl/pt", justify="right")
    table.add_column("goal")
    table.add_column("met")
    for row in summary["rows"]:
        k = row["workload"]
        repl_s = _fmt_ratio(row[REPL]) if k == CROSS_RATIO else _fmt(row[REPL])
        table.add_row(k, _fmt(row[PT]), _fmt(row[LOCAL]), repl_s,
                      _fmt_ratio(row["local/passthrough"]),
                      _fmt_ratio(row["replicated/passthrough"]), row["goal"], row["verdict"])
    console.print(table)


def _log_excerpts(base: Path, lines: int = 25) -> str:
    """The last lines of every log under `base` (cluster logs, the local mount's)."""
    out = []
    for p in sorted(base.rglob("*.log")):
        try:
            text = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if not text:
            continue
        out.append(f"--- {p} (last {min(lines, len(text))} of {len(text)} lines)")
        out.extend(text[-lines:])
    return "\n".join(out)


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


# ------------------------------------------------------------------ the command
def cmd_bench_fs(args) -> int:
    from rich.console import Console

    size = parse_size(args.size)
    if size < MiB:
        raise SystemExit("replfs bench fs: --size must be at least 1M")
    if args.rounds < 1 or args.seq_rounds < 0 or args.files < 1 or args.replicated_files < 1:
        raise SystemExit("replfs bench fs: --rounds, --files and --replicated-files must be "
                         ">= 1, --seq-rounds >= 0")
    disk_size = max(64 * MiB, size * 2 // 3)
    base = Path(tempfile.mkdtemp(prefix="replfs-bench-fs-", dir=args.dir or "/var/tmp"))
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=150)
    out = Console()
    if not out.is_terminal:
        out = Console(width=150)            # a file or a pipe: the whole table unwrapped
    errors: dict[str, str] = {}
    rounds: dict[str, list[dict]] = {PT: [], LOCAL: []}
    seq: dict[str, list[dict]] = {PT: [], LOCAL: []}
    nfiles = {PT: args.files, LOCAL: args.files, REPL: args.replicated_files}
    failed = False
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with ExitStack() as stack:
            mounts = {}
            console.print(f"[bold]bench fs[/]: scratch {base}; mounting passthrough, local"
                          f"{'' if args.no_replicated else ', replicated (2 groups x 2)'}…")
            mounts[PT] = stack.enter_context(passthrough(base))
            mounts[LOCAL] = stack.enter_context(replfs_local(base, disk_size))
            if not args.no_replicated:
                rounds[REPL], seq[REPL] = [], []
                t = time.monotonic()
                try:
                    mounts[REPL] = stack.enter_context(replicated(base / "repl", disk_size))
                    console.print(f"  replicated cluster up in {time.monotonic() - t:.1f} s")
                except Exception as exc:
                    errors[REPL] = f"starting the cluster: {exc!r}"
                    console.print(f"[red]replicated mount failed[/]: {exc!r}")
                    console.print(_log_excerpts(base / "repl"), markup=False, highlight=False)
            order = list(mounts)

            def run(name, what, fn):
                """fn() on one mount; a failure of the replicated mount is recorded and
                drops it from the rest of the run (the others go on)."""
                try:
                    return fn()
                except Exception as exc:
                    if name != REPL:
                        raise
                    errors[REPL] = f"{what}: {exc!r}"
                    console.print(f"[red]replicated mount failed in {what}[/]: {exc!r}")
                    console.print(traceback.format_exc(), markup=False, highlight=False)
                    console.print(_log_excerpts(base / "repl"), markup=False, highlight=False)
                    order.remove(REPL)
                    return None

            for s in range(args.seq_rounds):
                # rotated like the rounds below; the figures are the median of the passes
                k = s % len(order) if order else 0
                for name in list(order[k:] + order[:k]):
                    if name not in order:
                        continue
                    console.print(f"seq {s + 1}/{args.seq_rounds}: {name} ({size // MiB} MiB)…")
                    r = run(name, f"sequential pass {s + 1}",
                            lambda: seq_workload(mounts[name], size, f"{s}"))
                    if r is not None:
                        seq[name].append(r)
            for rnd in range(args.rounds):
                # rotate the order so that no mount always goes first (or last)
                k = rnd % len(order) if order else 0
                for name in list(order[k:] + order[:k]):
                    if name not in order:
                        continue
                    console.print(f"round {rnd + 1}/{args.rounds}: {name} "
                                  f"({nfiles[name]} files)…")
                    t = time.monotonic()
                    r = run(name, f"round {rnd + 1}",
                            lambda: meta_workload(mounts[name], nfiles[name], rnd, name == REPL))
                    if r is not None:
                        rounds[name].append(r)
                        console.print(f"  {time.monotonic() - t:.1f} s")
    except _Terminated:
        console.print("replfs bench fs: terminated (everything started is stopped)")
        return 143
    except Exception:
        failed = True
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if args.keep or failed or errors:
            console.print(f"scratch directory kept: {base}")
            if failed:
                console.print(_log_excerpts(base), markup=False, highlight=False)
        else:
            shutil.rmtree(base, ignore_errors=True)

    medians = {}
    for name in rounds:
        merged = _median(seq[name]) if seq[name] else {}
        merged.update(_median(rounds[name]) if rounds[name] else {})
        if merged:
            medians[name] = merged
    summary = summarise(medians, per_round_figures(seq, rounds))
    title = (f"replfs bench fs: {size // MiB} MiB sequential (median of {args.seq_rounds}), "
             f"small files {args.files} (replicated {args.replicated_files}, median of "
             f"{args.rounds})")
    caption = "\n".join([
        "ratios: the median of each round's, > 1 is faster (for latency: lower); goals (issue "
        "10): the replicated mount against the passthrough,",
        "`MISS got of goal` when missed; replicated = 2 groups x (primary + backup), "
        "directories spread by name;",
        "seq read: the file just written and fsync'd, read through a new open (as `cat` after "
        "`cp`), no cache dropped on any mount;",
        "seq re-read: the same file once more, through another open (the page cache kept "
        "across opens);",
        f"rename across/same group: same-group and cross-group renames alternate in batches "
        f"of {BATCH}"])
    if errors:
        caption += "\nreplicated: " + "; ".join(errors.values())
    print_table(out, summary, title, caption)
    if args.json:
        print(json.dumps({
            "config": {"size": size, "files": args.files,
                       "replicated_files": args.replicated_files, "rounds": args.rounds,
                       "seq_rounds": args.seq_rounds},
            "median": medians,
            "rounds": {k: v for k, v in rounds.items()},
            "seq": {k: v for k, v in seq.items()},
            "table": [{k: v for k, v in row.items() if not k.startswith("_")}
                      for row in summary["rows"]],
            "errors": errors,
            "goals": {"replicated/passthrough": GOALS, "fsync_ms": GOAL_FSYNC_MS,
                      "cross/same": GOAL_CROSS},
        }, indent=2))
    return 1 if errors else 0
