"""`replfs init | up | down | status | viewserver | server`, and `replfs mount DIR
MNT` without --local: the replicated cluster, its daemons and its FUSE client."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time

import trio

from replfs.errors import ReplfsError
from replfs.replication.config import CONFIG, VIEWSERVER, ClusterConfig
from replfs.raid import parse_size
from replfs.tools.mountpoints import ready_failer, spawn_ready, unmount, wait_mounted

log = logging.getLogger("replfs.cluster")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def register(sub) -> None:
    p = sub.add_parser("init", help="write a replicated cluster (config, secret, arrays) in DIR")
    p.add_argument("dir")
    p.add_argument("--groups", type=int, default=2,
                   help="replica groups the namespace is spread over (default 2)")
    p.add_argument("--replicas", type=int, default=2, help="servers per group (default 2)")
    p.add_argument("--placement", default="spread", metavar="spread|parent|N",
                   help="which group a new directory goes to: spread (by a hash of its "
                        "name, the default), parent (its parent's group), or group N")
    p.add_argument("--durability", default="written", choices=["written", "forced"],
                   help="when an update is answered: once written (in the image files) on "
                        "both replicas, forced within 1 s (the default), or once forced "
                        "(fsynced) on both (see docs/durability.md)")
    p.add_argument("--disks", type=int, default=4, help="disks per array (default 4)")
    p.add_argument("--size", default="128M", help="size of each disk image (default 128M)")
    p.add_argument("--new-secret", action="store_true",
                   help="only write a new secret in the existing (stopped) cluster DIR")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("up", help="start the cluster in DIR (initialising it) and mount it on MNT")
    p.add_argument("dir")
    p.add_argument("mountpoint")
    p.add_argument("--daemon", action="store_true", help="return once mounted (stop with `replfs down DIR`)")
    p.add_argument("--no-restart", action="store_true", help="do not restart servers that die")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users in (FUSE allow_other)")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="unmount and stop the cluster started by `replfs up DIR`")
    p.add_argument("dir")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="views, roles, processes, arrays and replication of DIR")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("viewserver", help="run the view server of the cluster in DIR")
    p.add_argument("dir")
    p.set_defaults(func=cmd_viewserver)

    p = sub.add_parser("server", help="run one replica server of the cluster in DIR")
    p.add_argument("dir")
    p.add_argument("--name", required=True, help="which server (s0, s1, ...)")
    p.set_defaults(func=cmd_server)



def _logging() -> None:
    import faulthandler
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # `kill -USR1 PID`: stacks to the log


# ---------------------------------------------------------------- init
def cmd_init(args) -> int:
    from replfs.tools.cluster import init_cluster
    from replfs.tools.mount_cmd import _holds_files, remove_new_files
    if args.new_secret:
        return _new_secret(args.dir)
    if os.path.exists(os.path.join(args.dir, CONFIG)):
        raise ReplfsError(f"{args.dir} already holds a cluster; remove it first to start over")
    if os.path.exists(os.path.join(args.dir, "array.json")):
        raise ReplfsError(f"{args.dir} holds a replfs array (`replfs mkfs`); give init an "
                          f"empty or new directory")
    if _holds_files(args.dir):
        raise ReplfsError(f"{args.dir} is not empty; give init an empty or new directory")
    disk_size = parse_size(args.size)
    before = set(os.listdir(args.dir)) if os.path.isdir(args.dir) else None
    try:
        cfg = trio.run(lambda: init_cluster(args.dir, groups=args.groups,
                                            replicas=args.replicas, disks=args.disks,
                                            disk_size=disk_size, placement=args.placement,
                                            durability=args.durability))
    except BaseException:
        remove_new_files(args.dir, before)     # no half-made cluster left behind
        raise
    print(f"replfs: cluster in {cfg.dir}: view server on {cfg.ports[VIEWSERVER]}; "
          + "; ".join(f"group {g}: " + ", ".join(f"{s} on {cfg.ports[s]}" for s in ss)
                      for g, ss in cfg.groups.items())
          + f"; directories placed by {cfg.placement}; updates answered once "
          + f"{cfg.durability} on both replicas (secret mode 0600)")
    return 0


def _new_secret(dirpath: str) -> int:
    from replfs.replication.config import write_secret
    from replfs.tools.cluster import Cluster
    cluster = Cluster(dirpath)
    running = [n for n in [VIEWSERVER, "mount", *cluster.cfg.servers] if cluster.alive(n)]
    if running:
        raise ReplfsError(f"the cluster in {cluster.dir} is running ({', '.join(running)}); "
                          f"stop it with `replfs down {dirpath}` first")
    path = write_secret(cluster.dir)
    print(f"replfs: wrote a new secret in {path} (mode 0600)")
    return 0


# ---------------------------------------------------------------- daemons
def cmd_viewserver(args) -> int:
    from replfs.replication.viewserver import ViewService, load_views, saver, serve_viewserver
    _logging()
    cfg = ClusterConfig.load(args.dir)
    _take_faults(cfg, VIEWSERVER)
    path = os.path.join(cfg.dir, "views.json")
    service = ViewService(cfg.ping_interval, cfg.dead_pings, save=saver(path))
    views = load_views(path)
    if views:
        log.info("resuming from the views in %s: %s", path, views)
    trio.run(_until_signal, lambda ts: serve_viewserver(cfg.ports[VIEWSERVER], cfg.secret(),
                                                          service, views, task_status=ts))
    return 0


def cmd_server(args) -> int:
    from replfs.raid import open_array
    from replfs.replication.server import ReplicaServer
    _logging()
    cfg = ClusterConfig.load(args.dir)
    cfg.group_of(args.name)
    _take_faults(cfg, args.name)
    array = open_array(cfg.server_dir(args.name))
    try:
        server = ReplicaServer(cfg, args.name, array)
        trio.run(_until_signal, lambda ts: server.run(task_status=ts))
    finally:
        array.close()
    return 0


def _take_faults(cfg: ClusterConfig, node: str) -> None:
    """This process is `node`: its connections enforce the network faults in force
    (`replfs fault` tells it of later changes over its listener)."""
    from replfs.replication import wire
    f = cfg.read_faults()
    wire.FAULTS.node = node
    try:
        wire.FAULTS.update(f["generation"], f["partitions"], f["loss"])
    except ValueError as exc:
        raise ReplfsError(f"{cfg.faults_path()}: {exc}; delete it and run "
                          f"`replfs fault heal {cfg.dir}`") from None
    if f["partitions"] or f["loss"]:
        log.warning("%s: network faults in force: %s", node, wire.FAULTS)


async def _until_signal(start) -> None:
    """Run `start(task_status)` until SIGINT/SIGTERM (then cancel it: clean close)."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            await nursery.start(lambda task_status: start(task_status))
            async for sig in sigs:
                log.info("signal %d: stopping", sig)
                nursery.cancel_scope.cancel()
                return


# ---------------------------------------------------------------- mount
def cmd_mount(args) -> int:
    from replfs.tools.mount_cmd import _check_mountpoint
    from replfs.tools.mount_cmd import mount_argv, parse_mount_options
    _check_mountpoint(args.mountpoint)
    cfg = ClusterConfig.load(args.dir)
    cfg.secret()                      # a damaged secret: say so here, not in a log
    if args.daemon:
        return _spawn_and_wait(["mount", cfg.dir, os.path.abspath(args.mountpoint),
                                *mount_argv(args)], cfg, "mount",
                               f"mounted {cfg.dir} on {args.mountpoint}")
    _logging()
    _, options = parse_mount_options(args.options)
    trio.run(lambda: serve_remote(cfg.dir, args.mountpoint, args.allow_other, args.ready_fd,
                                  options=options))
    return 0


def _spawn_and_wait(argv: list[str], cfg: ClusterConfig, name: str, what: str) -> int:
    """Start `replfs ARGV` detached; return once it is serving."""
    pid = spawn_ready(argv, os.path.join(cfg.log_dir(), f"{name}.log"))
    print(f"replfs: {what} (pid {pid}, log {cfg.log_dir()}/{name}.log)")
    return 0


async def serve_remote(dirpath: str, mnt: str, allow_other: bool = False,
                       ready_fd: int | None = None, options=frozenset()) -> None:
    """Mount the cluster in `dirpath` on `mnt` (a RemoteFS behind the FUSE adapter) and
    serve until unmounted or signalled."""
    from replfs.fs.fuse_ops import Operations
    from replfs.replication.client import RemoteFS
    from replfs.tools.mount_cmd import serve_fuse

    fail = ready_failer(ready_fd)
    cfg = ClusterConfig.load(dirpath)
    rfs = RemoteFS(cfg)
    async with trio.open_nursery() as outer:
        await outer.start(rfs.run)
        try:
            with trio.fail_after(30):
                await rfs.statfs()
        except (trio.TooSlowError, OSError) as exc:
            fail(f"no primary of the cluster in {dirpath} answered ({exc}); is it up? "
                 f"(`replfs status {dirpath}`)")
        try:
            await serve_fuse(Operations(rfs), mnt, allow_other=allow_other, ready_fd=ready_fd,
                             fail=fail, options=options, source=cfg.dir)
        finally:
            await rfs.aclose()
            log.info("unmounted %s (client stats %s; requests %s)", mnt, rfs.stats,
                     dict(rfs.methods.most_common()))
            outer.cancel_scope.cancel()


# ---------------------------------------------------------------- up / down
def cmd_up(args) -> int:
    from replfs.tools.cluster import Cluster, init_cluster
    from replfs.tools.mount_cmd import _check_mountpoint
    _check_mountpoint(args.mountpoint)
    if not os.path.exists(os.path.join(args.dir, CONFIG)):
        if os.path.isdir(args.dir) and os.listdir(args.dir):
            raise ReplfsError(f"{args.dir} is neither empty nor a replfs cluster; pick another "
                              f"directory")
        trio.run(lambda: init_cluster(args.dir))
    cfg = ClusterConfig.load(args.dir)
    cfg.secret()                      # a damaged secret: say so before starting anything
    if args.daemon:
        argv = ["up", cfg.dir, os.path.abspath(args.mountpoint)]
        if args.no_restart:
            argv.append("--no-restart")
        if args.allow_other:
            argv.append("--allow-other")
        return _spawn_and_wait(argv, cfg, "up", f"cluster {cfg.dir} up, mounted on "
                               f"{args.mountpoint}; stop it with `replfs down {args.dir}`")
    _logging()
    cluster = Cluster(cfg.dir)
    if any(cluster.alive(n) for n in [VIEWSERVER, *cfg.servers]):
        raise ReplfsError(f"the cluster in {cfg.dir} is already running; `replfs down {cfg.dir}` first")
    with open(cfg.pid_path("up"), "w") as f:
        f.write(f"{os.getpid()}\n")
    stop = [False]
    mounted = [False]

    def on_signal(sig, frame):
        stop[0] = True
        if not mounted[0]:
            raise KeyboardInterrupt     # still starting: give up now (the finally cleans up)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start_all()
        cluster.wait_protected(timeout=120)
        cluster.start("mount", ["mount", cfg.dir, os.path.abspath(args.mountpoint)]
                      + (["--allow-other"] if args.allow_other else []))
        _wait_mounted(cluster, args.mountpoint)
        mounted[0] = True
        print(f"replfs: {cfg.dir} mounted on {args.mountpoint}; Ctrl-C unmounts and stops",
              flush=True)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
            args.ready_fd = None
        died: dict[str, float] = {}
        while not stop[0]:
            time.sleep(0.2)
            if not cluster.alive("mount"):
                log.warning("the mount process exited; stopping the cluster")
                break
            for s in cfg.servers:
                if cluster.alive(s):
                    died.pop(s, None)
                elif not args.no_restart:
                    t = died.setdefault(s, time.monotonic())
                    if time.monotonic() - t > 1.0:
                        log.warning("server %s died; restarting it", s)
                        cluster.start_server(s)
                        died.pop(s, None)
    except ReplfsError as exc:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"error: " + str(exc).encode())
        raise
    finally:
        unmount(args.mountpoint)
        cluster.stop_all()
        try:
            os.unlink(cfg.pid_path("up"))
        except FileNotFoundError:
            pass
        print("replfs: unmounted and stopped", flush=True)
    return 0


def _wait_mounted(cluster, mnt: str, timeout: float = 30.0) -> None:
    wait_mounted(mnt, lambda: cluster.alive("mount"),
                 f"the mount process (log {cluster.cfg.log_dir()}/mount.log)", timeout)


def cmd_down(args) -> int:
    import psutil

    from replfs.tools.cluster import Cluster
    cluster = Cluster(args.dir)
    pid = cluster.pid("up")
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        try:
            psutil.Process(pid).wait(60)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            raise ReplfsError(f"`replfs up` (pid {pid}) did not stop within 60 s") from None
    running = [n for n in ["mount", *cluster.cfg.servers, VIEWSERVER] if cluster.alive(n)]
    cluster.stop_all()
    print(f"replfs: cluster {cluster.dir} stopped"
          + (f" (also stopped {', '.join(running)})" if running else ""))
    return 0


# ---------------------------------------------------------------- status
def cmd_status(args) -> int:
    import psutil

    from replfs.tools.cluster import Cluster
    cluster = Cluster(args.dir)
    st = cluster.status()
    for name in ["up", VIEWSERVER, "mount", *cluster.cfg.servers]:
        pid = cluster.pid(name)
        info = dict(pid=pid, running=pid is not None)
        if pid is not None:
            try:
                p = psutil.Process(pid)
                info.update(cpu_percent=p.cpu_percent(interval=0.05), rss=p.memory_info().rss)
            except psutil.Error:
                pass
        st.setdefault("processes", {})[name] = info
    st["in_doubt"] = in_doubt(cluster.cfg, st)
    st["pending_decisions"] = {s: (st["servers"].get(s) or {}).get("pending_decisions", 0)
                               for s in cluster.cfg.servers
                               if (st["servers"].get(s) or {}).get("pending_decisions")}
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    _print_status(cluster.cfg, st)
    return 0


def in_doubt(cfg, st: dict) -> list[dict]:
    """Every prepared, undecided 2PC transaction a server reports, oldest first:
    {server, group, gtid, coordinator, age}."""
    out = []
    for s in cfg.servers:
        for t in (st["servers"].get(s) or {}).get("in_doubt") or []:
            out.append(dict(server=s, group=cfg.group_of(s), gtid=str(t.get("gtid", "?")),
                            coordinator=t.get("coordinator"), age=t.get("age")))
    return sorted(out, key=lambda t: -(t["age"] or 0))


def _size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return "?"


def _replication(info: dict) -> str:
    done, total = info.get("sync_progress", [0, 0]) or [0, 0]
    if info.get("role") == "primary":
        rep = f"lag {_size(info.get('lag_bytes', 0))}"
        if total and done < total:
            rep += f", xfer {done}/{total}"
        return rep
    if info.get("role") == "backup":
        return ("in sync" if info.get("backup_synced") else
                f"xfer {done}/{total}" if total else "not in sync")
    return "-"


def _print_status(cfg, st: dict) -> None:
    """The views, the 2PC state, then one row per server, in 80 columns."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    vs = st.get("viewserver") or {}
    if not vs:
        console.print("[red]view server not answering[/red]")
    views = vs.get("groups") or {}
    for g in sorted(set(cfg.groups) | {int(k) for k in views}):
        v = views.get(str(g))
        if v is None:
            console.print(f"group {g}: [yellow]no view yet[/yellow] "
                          f"(servers {', '.join(cfg.groups.get(g, []))})")
            continue
        state = ("[red]UNPROTECTED (no backup)[/red]" if v["unprotected"] else
                 "[red]no primary[/red]" if not v["primary"] else "[green]protected[/green]")
        if not v["acked"]:
            state += " [yellow](view not acknowledged: state transfer?)[/yellow]"
        console.print(f"group {g}: view {v['view']}  primary {v['primary'] or '-'}  "
                      f"backup {v['backup'] or '-'}  {state}")
    doubts = st.get("in_doubt")
    if doubts is None:
        doubts = in_doubt(cfg, st)
    pending = {s: (st["servers"].get(s) or {}).get("pending_decisions")
               for s in cfg.servers}
    pending = {s: n for s, n in pending.items() if n}
    for t in doubts:
        age = f"{t['age']:.1f} s" if isinstance(t["age"], (int, float)) else "?"
        coord = "?" if t["coordinator"] is None else t["coordinator"]
        console.print(f"[yellow]in doubt:[/yellow] {escape(t['gtid'])} on {t['server']} "
                      f"(coordinator group {coord}) for {age}")
    if pending:
        console.print(("" if doubts else "no transactions in doubt; ")
                      + "decisions not yet acknowledged by every participant: "
                      + ", ".join(f"{n} on {s}" for s, n in pending.items()))
    elif not doubts:
        console.print("no transactions in doubt, no decisions pending")
    t = Table(title=f"replfs cluster {cfg.dir}", box=box.SIMPLE_HEAD, pad_edge=False,
              show_edge=False, collapse_padding=True, title_justify="left")
    for col, right in (("srv", False), ("grp", True), ("role", False), ("pid", True),
                       ("cpu", True), ("mem", True), ("array", False), ("log", True),
                       ("commit", True), ("abort", True), ("replication", False)):
        t.add_column(col, justify="right" if right else "left", no_wrap=col != "replication")
    for s in cfg.servers:
        info = st["servers"].get(s) or {}
        proc = st.get("processes", {}).get(s, {})
        g = str(cfg.group_of(s))
        if not info:
            t.add_row(s, g, "[red]down[/red]" if not proc.get("running")
                      else "[yellow]silent[/yellow]", str(proc.get("pid") or "-"),
                      *[""] * 7)
            continue
        txn = info.get("txn", {})
        arr = info.get("array", {})
        role = info.get("role", "?")
        if role == "primary" and not info.get("serving", True):
            role = "primary!"         # primary in its own eyes, but not serving
        health = str(arr.get("health", "?"))
        health = "ok" if health == "healthy" else health
        t.add_row(s, g, role, str(info.get("pid", "-")),
                  f"{proc.get('cpu_percent', info.get('cpu_percent', 0)) or 0:.0f}%",
                  _size(proc.get("rss", info.get("rss", 0))),
                  f"{health} {arr.get('disks_ok', '?')}/{arr.get('disks', '?')}"
                  + (f" {arr['repaired']} fixed" if arr.get("repaired") else ""),
                  f"{_size(txn.get('log_bytes_used', 0))}/{_size(txn.get('log_size', 0))}",
                  str(txn.get("commits", "")), str(txn.get("aborts", "")),
                  _replication(info))
    console.print(t)
    if any(not (st["servers"].get(s) or {}).get("serving", True) for s in cfg.servers
           if (st["servers"].get(s) or {}).get("role") == "primary"):
        console.print("primary! = primary of its last view, but not serving (cut off from "
                      "the view server?)")
