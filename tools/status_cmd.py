"""`replfs status DIR`: one line saying whether the cluster is healthy, what is wrong if
it is not, where it is mounted and how full it is, each group's view, the two-phase
commit state, and one row per server -- in 80 columns, with an exit code a script can
test (as `mdadm --detail --test` and `zpool status -x` give):

    0  healthy      every group has a primary and an in-sync backup, every array
                    every disk, every process that should run runs
    1  degraded     still two copies of everything, but something needs a look: a
                    disk of an array failed, unrecoverable blocks, a silent process,
                    the view server or the mount gone, a transaction long in doubt
    3  unprotected  a group runs on one replica (no backup, or a backup still
                    catching up): one more failure loses it
    4  unavailable  a group has no serving primary: its files cannot be used
    5  not running  no process of the cluster runs

The disk counters are the arrays' own (their superblocks), the numbers
`replfs raid status DIR/S` shows for server S.
"""

from __future__ import annotations

import json
import os
import textwrap
import threading

import psutil


HEALTHY, DEGRADED, UNPROTECTED, UNAVAILABLE, NOT_RUNNING = (
    "healthy", "degraded", "unprotected", "unavailable", "not running")
EXIT = {HEALTHY: 0, DEGRADED: 1, UNPROTECTED: 3, UNAVAILABLE: 4, NOT_RUNNING: 5}
WIDTH = 80
DOUBT_AGE = 10.0        # a transaction in doubt longer than this (s) makes it "degraded"


def cmd_status(args) -> int:
    from replfs.tools.cluster import Cluster
    cluster = Cluster(args.dir)
    st = collect(cluster)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print("\n".join(render(cluster.cfg, st)))
    return EXIT[st["state"]]


# ---------------------------------------------------------------- collect
def collect(cluster) -> dict:
    """Everything `status` shows, JSON-able: the servers' and the view server's own
    reports (`viewserver`, `servers`), `processes` (name -> pid, running, cpu, rss),
    `arrays` (server -> the array's status as `replfs raid status` reads it), `mounts`,
    `up` (what `replfs up` recorded), `in_doubt`, `pending_decisions`, and the verdict:
    `state` and `problems` (one sentence each)."""
    from replfs.tools.cluster import find_processes, gather_status, read_run_state

    import trio
    cfg = cluster.cfg
    found = find_processes(cluster.dir)
    procs = {}
    for name in ["up", *cfg.viewservers, "mount", *cfg.servers]:
        pids = [f.pid for f in found if f.name == name and not f.daemon]
        pid = pids[0] if pids else None
        info = dict(pid=pid, running=pid is not None)
        if pid is not None:
            try:
                p = psutil.Process(pid)
                info.update(cpu_percent=p.cpu_percent(interval=0.05), rss=p.memory_info().rss)
            except psutil.Error:
                pass
        procs[name] = info
    run = read_run_state(cfg)
    if not found and cfg.one_machine:
        st = {"viewserver": {}, "servers": {s: {} for s in cfg.servers}}
    else:
        st = trio.run(gather_status, cfg, 2.0)
    if not cfg.one_machine:
        # over several machines a node that does not run here runs where it answers from;
        # of the view servers only the active one answers (standbys refuse every
        # connection), and it names the others that run (each keeps a key under its etcd
        # lease)
        active = (st["viewserver"] or {}).get("name")
        alive = (st["viewserver"] or {}).get("running") or {}
        for name in [*cfg.viewservers, *cfg.servers]:
            info = ((st["viewserver"] if name == active else alive.get(name))
                    if name in cfg.viewservers else st["servers"].get(name))
            if not procs[name]["running"]:
                procs[name] = dict(pid=(info or {}).get("pid"), running=bool(info), remote=True)
    st["processes"] = procs
    st["up"] = run
    st["arrays"] = {s: _array(cfg.server_dir(s)) for s in cfg.servers
                    if cfg.one_machine or os.path.isdir(cfg.server_dir(s))}
    mnts = [f.mountpoint for f in found if f.name == "mount" and f.mountpoint]
    if run.get("mountpoint") and run.get("mountpoint") not in mnts:
        mnts.insert(0, run["mountpoint"])
    st["mounts"] = [_mount(m, [f.pid for f in found if f.name == "mount"
                               and f.mountpoint == m]) for m in mnts]
    st["in_doubt"] = in_doubt(cfg, st)
    st["pending_decisions"] = {s: (st["servers"].get(s) or {}).get("pending_decisions", 0)
                               for s in cfg.servers
                               if (st["servers"].get(s) or {}).get("pending_decisions")}
    st["state"], st["problems"] = verdict(cfg, st, found)
    return st


def _array(path: str) -> dict:
    from replfs.raid import inspect_array
    try:
        return inspect_array(path)
    except Exception as exc:        # a damaged array is a finding, not a crash of status
        return {"health": "unknown", "error": str(exc).splitlines()[0], "disks": []}


def _statvfs(path: str, timeout: float = 2.0):
    """os.statvfs(path), in a thread: a hung FUSE mount must not hang `status`.
    Returns the result, an OSError, or None when it did not answer in time."""
    out = []

    def run():
        try:
            out.append(os.statvfs(path))
        except OSError as exc:
            out.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


def _mount(mnt: str, pids: list[int]) -> dict:
    from replfs.tools.mountpoints import is_mounted
    m = dict(path=mnt, pid=pids[0] if pids else None, mounted=is_mounted(mnt))
    if not m["mounted"]:
        return m
    v = _statvfs(mnt)
    if v is None:
        m["error"] = "does not answer"
    elif isinstance(v, OSError):
        m["error"] = v.strerror or str(v)
    else:
        m.update(size=v.f_blocks * v.f_frsize, free=v.f_bfree * v.f_frsize,
                 avail=v.f_bavail * v.f_frsize)
    return m


def in_doubt(cfg, st: dict) -> list[dict]:
    """Every prepared, undecided 2PC transaction a server reports, oldest first:
    {server, group, gtid, coordinator, age}."""
    out = []
    for s in cfg.servers:
        for t in (st["servers"].get(s) or {}).get("in_doubt") or []:
            out.append(dict(server=s, group=cfg.group_of(s), gtid=str(t.get("gtid", "?")),
                            coordinator=t.get("coordinator"), age=t.get("age")))
    return sorted(out, key=lambda t: -(t["age"] or 0))


# ---------------------------------------------------------------- verdict
def verdict(cfg, st: dict, found) -> tuple[str, list[str]]:
    """(state, problems): the worst state any finding calls for, and each finding."""
    if not found and not st.get("viewserver"):
        return NOT_RUNNING, []
    worst = [HEALTHY]
    problems: list[str] = []
    order = [HEALTHY, DEGRADED, UNPROTECTED, UNAVAILABLE]

    def bad(state: str, text: str) -> None:
        problems.append(text)
        if order.index(state) > order.index(worst[0]):
            worst[0] = state

    procs, servers = st["processes"], st["servers"]
    run = st.get("up") or {}
    given_up = run.get("given_up") or {}
    up_alive = procs["up"]["running"]
    if run and not up_alive:
        bad(DEGRADED, f"`replfs up` (pid {run.get('pid')}) was killed: nothing restarts "
                      f"a server that dies; `replfs down {cfg.dir}` stops what it left")
    vs = st.get("viewserver") or {}
    if not vs:
        bad(DEGRADED, "the view server does not answer: no failover is possible"
            + ("" if any(procs[v]["running"] for v in cfg.viewservers) else " (not running)"))
    if len(cfg.viewservers) > 1:
        down = [v for v in cfg.viewservers if not procs[v]["running"]]
        if down:
            bad(DEGRADED, f"view server{'s' if len(down) > 1 else ''} {', '.join(down)} "
                          f"not running: {len(cfg.viewservers) - len(down)} of "
                          f"{len(cfg.viewservers)} left to take over")
    views = vs.get("groups") or {}
    for g, members in cfg.groups.items():
        v = views.get(str(g))
        if not vs:
            pass
        elif v is None or not v.get("primary"):
            bad(UNAVAILABLE, f"group {g} has no primary: its files cannot be used")
        elif not servers.get(v["primary"], {}).get("serving", False):
            bad(UNAVAILABLE, f"group {g}: primary {v['primary']} is not serving")
        elif not v.get("backup"):
            bad(UNPROTECTED, f"group {g} has no backup: {v['primary']} holds the only copy")
        elif not v.get("acked") or not servers.get(v["primary"], {}).get("backup_synced",
                                                                          True):
            bad(UNPROTECTED, f"group {g}: backup {v['backup']} is still catching up")
        for s in members:
            if s in given_up:
                bad(DEGRADED, f"{s}: `replfs up` {given_up[s]}")
            elif not procs[s]["running"]:
                bad(DEGRADED, f"{s} at {cfg.where(s)} does not answer"
                    if procs[s].get("remote") else f"{s} is not running")
            elif not servers.get(s):
                bad(DEGRADED, f"{s} runs (pid {procs[s]['pid']}) but does not answer")
    for s, a in st["arrays"].items():
        where = f"`replfs raid status {cfg.server_dir(s)}`"
        if a.get("error"):
            bad(DEGRADED, f"{s}: the array cannot be read: {a['error']}")
            continue
        if a.get("health") != "healthy":
            off = ", ".join(f"disk {d['index']} {d['state']}" for d in a.get("disks", [])
                            if d["state"] != "active")
            bad(DEGRADED, f"{s}: array {a.get('health')} ({off}); see {where}")
        lost = sum(d.get("unrecoverable", 0) for d in a.get("disks", []))
        if lost:
            bad(DEGRADED, f"{s}: {lost} blocks of the array could not be rebuilt; see {where}")
    for s, srv in servers.items():
        if srv and srv.get("lost_blocks"):
            bad(DEGRADED, lost_text(s, srv))
    if run and up_alive and not procs["mount"]["running"]:
        bad(DEGRADED, "the mount process is not running")
    for m in st["mounts"]:
        if m.get("mounted") and m.get("error"):
            bad(DEGRADED, f"{m['path']}: {m['error']}; `replfs down {cfg.dir}` unmounts it")
    for t in st["in_doubt"]:
        if (t.get("age") or 0) > DOUBT_AGE:
            bad(DEGRADED, f"{t['server']}: transaction {t['gtid']} in doubt for "
                          f"{t['age']:.0f} s")
    return worst[0], problems


def lost_text(s: str, srv: dict) -> str:
    """One sentence: the blocks server `s` could not read nor heal, and whose they are."""
    lost = srv["lost_blocks"]
    head = (f"{s}: {len(lost)} block{'s' if len(lost) > 1 else ''} held by no replica "
            f"(reads of {'them' if len(lost) > 1 else 'it'} give EIO)")
    lf = srv.get("lost_files") or {}
    if lf.get("error"):
        return f"{head}; {lf['error']}"
    parts = [f"{f['path']} (inode {f['inode']}, {len(f['blocks'])} block"
             f"{'s' if len(f['blocks']) > 1 else ''})" for f in lf.get("files", [])]
    parts += [f"{n} in the {r}" for r, n in sorted((lf.get("other") or {}).items())]
    if lf.get("more_files"):
        parts.append(f"and {lf['more_files']} more files")
    return f"{head}: " + ", ".join(parts) + ("; restore those files (rewrite or remove them)"
                                             if lf.get("files") else "")


# ---------------------------------------------------------------- render
def _size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return "?"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False, break_long_words=False) or [indent]


# (header, width, right-aligned)
COLUMNS = [("srv", 3, False), ("grp", 3, True), ("role", 8, False), ("pid", 7, True),
           ("cpu", 4, True), ("mem", 5, True), ("disks", 5, False), ("fixed", 5, True),
           ("log", 4, True), ("commits", 8, True), ("undone", 6, True),
           ("replication", 11, False)]
LEGEND = ("fixed: checksum errors repaired, as `replfs raid status DIR/sN` counts them; "
          "log: share of the transaction log in use; undone: transactions rolled back "
          "(an operation that failed, e.g. with ENOENT, or one retried after a lock "
          "conflict)")


def _row(cells: list[str]) -> str:
    out = []
    for (_, width, right), cell in zip(COLUMNS, cells):
        cell = cell if len(cell) <= width else cell[:width - 1] + "~"
        out.append(cell.rjust(width) if right else cell.ljust(width))
    return " ".join(out).rstrip()


def _replication(info: dict) -> str:
    done, total = info.get("sync_progress", [0, 0]) or [0, 0]
    kind = {"incremental": "incr ", "full": "full "}.get(info.get("sync_kind"), "sync ")
    pct = f"{kind}{100 * done // total}%" if total and done < total else ""
    if info.get("role") == "primary":
        return pct or f"lag {_size(info.get('lag_bytes', 0))}"
    if info.get("role") == "backup":
        return "in sync" if info.get("backup_synced") else (pct or "not in sync")
    return "-"


def _transfers(st: dict) -> list[str]:
    """One line per state transfer running from a primary: its kind and how far."""
    out = []
    for name, info in sorted(st["servers"].items()):
        info = info or {}
        done, total = info.get("sync_progress", [0, 0]) or [0, 0]
        if info.get("role") == "primary" and total and done < total:
            out += _wrap(f"{name}: {info.get('sync_kind') or 'state'} transfer to its "
                         f"backup, {done} of {total} blocks sent", "")
    return out


def render(cfg, st: dict) -> list[str]:
    """The report, as lines of at most 80 columns (a path longer than that aside)."""
    state = st["state"]
    if state == NOT_RUNNING:
        if not cfg.one_machine:
            return [f"{cfg.dir}: not running (no node answers; start each on its machine: "
                    f"`replfs viewserver {cfg.dir}`, `replfs server {cfg.dir} S`)"]
        return [f"{cfg.dir}: not running (start it with `replfs up {cfg.dir} MOUNTPOINT`)"]
    lines = [f"{cfg.dir}: {state}"]
    for p in st["problems"]:
        lines += _wrap(p)
    procs = st["processes"]
    run = st.get("up") or {}
    if procs["up"]["running"]:
        restarts = run.get("restarts") or {}
        lines += _wrap(f"replfs up: pid {procs['up']['pid']}"
                       + (", restarted " + ", ".join(f"{s} {n}x" for s, n in
                                                     sorted(restarts.items()))
                          if restarts else ""), "")
    if not st["mounts"]:
        lines.append("not mounted")
    for m in st["mounts"]:
        where = f"mounted on {m['path']}" + (f" (pid {m['pid']})" if m.get("pid") else "")
        if not m.get("mounted"):
            lines += _wrap(f"{m['path']}: not mounted", "")
        elif "size" in m:
            used = m["size"] - m["free"]
            lines += _wrap(f"{where}: {_size(used)} used, {_size(m['avail'])} available "
                           f"of {_size(m['size'])}", "")
        else:
            lines += _wrap(f"{where}: {m.get('error', '?')}", "")
    vs = st.get("viewserver") or {}
    if len(cfg.viewservers) > 1 or cfg.etcd:
        active = vs.get("name", "")
        standby = [v for v in cfg.viewservers if v != active and procs[v]["running"]]
        lines += _wrap(f"view servers: {active or 'none'} active"
                       + (f", {', '.join(standby)} standing by" if standby else "")
                       + (f"; views in etcd {', '.join(cfg.etcd)}" if cfg.etcd else ""), "")
    views = vs.get("groups") or {}
    for g in sorted(cfg.groups):
        v = views.get(str(g))
        if v is None:
            lines.append(f"group {g}: no view (servers {', '.join(cfg.groups[g])})")
            continue
        servers = st["servers"]
        word = ("no primary" if not v["primary"] else "unprotected" if not v["backup"]
                else "catching up" if not v.get("acked") or not servers.get(
                    v["primary"], {}).get("backup_synced", True) else "protected")
        lines.append(f"group {g}: view {v['view']}, primary {v['primary'] or '-'}, backup "
                     f"{v['backup'] or '-'}: {word}")
    for t in st["in_doubt"]:
        age = f"{t['age']:.1f} s" if isinstance(t["age"], (int, float)) else "?"
        coord = "?" if t["coordinator"] is None else t["coordinator"]
        lines += _wrap(f"in doubt: {t['gtid']} on {t['server']} (coordinator group "
                       f"{coord}) for {age}", "")
    pending = st.get("pending_decisions") or {}
    if pending:
        lines += _wrap("2PC decisions not yet acknowledged by every participant: "
                       + ", ".join(f"{n} on {s}" for s, n in pending.items()), "")
    elif not st["in_doubt"]:
        lines.append("2PC: no transactions in doubt, no decisions pending")
    lines.append("")
    lines.append(_row([c for c, _, _ in COLUMNS]))
    lines.append("-" * len(lines[-1]))
    given_up = run.get("given_up") or {}
    for s in cfg.servers:
        lines.append(_server_row(cfg, s, st, s in given_up))
    lines += _transfers(st)
    for s in cfg.servers:
        live = ((st["servers"].get(s) or {}).get("array") or {}).get("repaired") or 0
        saved = sum(d.get("cksum_errors", 0) for d in (st["arrays"].get(s) or {}).get("disks")
                    or [])
        if live > saved:
            lines += _wrap(f"{s}: {live - saved} more checksum errors repaired since its "
                           f"array last wrote its counters (at its next flush)", "")
    from replfs.tools.raid_online import job_line
    for s in cfg.servers:
        job = (st["servers"].get(s) or {}).get("array_job")
        if job and (job["state"] in ("running", "paused", "failed")):
            lines += _wrap(f"{s}: {job_line(job)}", "")
    if any((st["servers"].get(s) or {}).get("role") == "primary"
           and not (st["servers"].get(s) or {}).get("serving", True) for s in cfg.servers):
        lines += _wrap("primary! = primary of its last view, but not serving (cut off "
                       "from the view server?)", "")
    lines += _wrap(LEGEND, "")
    return lines


def _server_row(cfg, s: str, st: dict, given_up: bool) -> str:
    info = st["servers"].get(s) or {}
    proc = st["processes"].get(s, {})
    arr = st["arrays"].get(s) or {}
    disks = arr.get("disks") or []
    counts = f"{sum(1 for d in disks if d['state'] == 'active')}/{len(disks)}" if disks else "?"
    if arr.get("health") not in ("healthy", None):
        counts += "!"
    fixed = str(sum(d.get("cksum_errors", 0) for d in disks))
    g = str(cfg.group_of(s))
    if not info:
        role = ("gave up" if given_up else "down" if not proc.get("running") else "silent")
        return _row([s, g, role, str(proc.get("pid") or "-"), "", "", counts, fixed])
    txn = info.get("txn", {})
    role = info.get("role", "?")
    if role == "primary" and not info.get("serving", True):
        role = "primary!"
    log_pct = (f"{100 * txn['log_bytes_used'] // txn['log_size']}%"
               if txn.get("log_size") else "")
    cpu = proc.get("cpu_percent", info.get("cpu_percent"))
    return _row([s, g, role, str(info.get("pid", "-")),
                 f"{cpu or 0:.0f}%", _size(proc.get("rss", info.get("rss", 0))),
                 counts, fixed, log_pct, str(txn.get("commits", "")),
                 str(txn.get("aborts", "")), _replication(info)])
