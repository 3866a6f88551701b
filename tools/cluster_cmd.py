"""`replfs init | up | down | status | viewserver | server`, and `replfs mount DIR
MNT` without --local: the replicated cluster, its daemons and its FUSE client."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import trio

from replfs.errors import ReplfsError
from replfs.replication.config import CONFIG, VIEWSERVER, ClusterConfig
from replfs.raid import parse_size
from replfs.tools.mount_cmd import add_checksum_cache, checksum_cache
from replfs.tools.mountpoints import ready_failer, spawn_ready, unmount, wait_mounted

log = logging.getLogger("replfs.cluster")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def register(sub) -> None:
    p = sub.add_parser("init", help="write a replicated cluster (config, secret, arrays) in DIR")
    p.add_argument("dir")
    p.add_argument("--groups", type=int, default=2,
                   help="replica groups the namespace is spread over (default 2)")
    p.add_argument("--replicas", type=int, default=None,
                   help="servers per group (default 2; with --server, their number "
                        "divided by --groups)")
    p.add_argument("--viewserver", action="append", metavar="[NAME=]HOST:PORT",
                   help="a cluster over several machines: where the view server listens "
                        "(with --server; init then writes only the description and the "
                        "secret, and `init DIR --here S` makes each server's array on its "
                        "own machine); once per view server (NAME defaults to vs, vs1, "
                        "...; more than one needs --etcd)")
    p.add_argument("--server", action="append", metavar="[NAME=]HOST:PORT",
                   help="a server of a cluster over several machines and where it "
                        "listens, once per server, in group order (NAME defaults to s0, "
                        "s1, ...)")
    p.add_argument("--here", metavar="S", default=None,
                   help="in DIR holding a description copied from the machine that ran "
                        "init: make server S's array and filesystem on this machine")
    p.add_argument("--placement", default="spread", metavar="spread|parent|N",
                   help="which group a new directory goes to: spread (by a hash of its "
                        "name, the default), parent (its parent's group), or group N")
    p.add_argument("--durability", default="written", choices=["written", "forced"],
                   help="when an update is answered: once written (in the image files) on "
                        "both replicas, forced within 1 s (the default), or once forced "
                        "(fsynced) on both (see docs/durability.md)")
    p.add_argument("--viewservers", type=int, default=1,
                   help="view server processes, one active and the others standing by "
                        "(default 1; more than one needs --etcd)")
    p.add_argument("--etcd", default="", metavar="HOST:PORT[,HOST:PORT...]",
                   help="keep the views in this etcd cluster (its client URLs) instead "
                        "of DIR/views.json (see docs/architecture.md)")
    p.add_argument("--disks", type=int, default=4, help="disks per array (default 4)")
    p.add_argument("--size", default="2G",
                   help="size of each disk image, sparse: it takes disk space only as "
                        "it is written (default 2G)")
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

    p = sub.add_parser("down", help="unmount and stop every process of the cluster in DIR "
                                    "(whoever started it)")
    p.add_argument("dir")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="is the cluster in DIR healthy (exit 0), degraded (1), "
                                      "unprotected (3), unavailable (4) or not running (5); "
                                      "then its mounts, views, servers and arrays")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("viewserver", help="run a view server of the cluster in DIR")
    p.add_argument("dir")
    p.add_argument("--name", default=VIEWSERVER,
                   help="which view server (vs, vs1, ...; default vs)")
    p.set_defaults(func=cmd_viewserver)

    p = sub.add_parser("server", help="run one replica server of the cluster in DIR")
    p.add_argument("dir")
    p.add_argument("server", nargs="?", metavar="S", help="which server (s0, s1, ...)")
    p.add_argument("--name", help="the same as S")
    add_checksum_cache(p)
    p.set_defaults(func=cmd_server)



def _logging() -> None:
    import faulthandler
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # `kill -USR1 PID`: stacks to the log


# ---------------------------------------------------------------- init
def cmd_init(args) -> int:
    from replfs.tools.cluster import init_cluster
    from replfs.tools.mount_cmd import remove_new_files
    if args.new_secret:
        return _new_secret(args.dir)
    if args.here:
        return _init_here(args.dir, args.here)
    if args.server or args.viewserver:
        return _init_nodes(args)
    _check_new_dir(args.dir)
    disk_size = parse_size(args.size)
    before = set(os.listdir(args.dir)) if os.path.isdir(args.dir) else None
    try:
        cfg = trio.run(lambda: init_cluster(args.dir, groups=args.groups,
                                            replicas=2 if args.replicas is None else args.replicas,
                                            disks=args.disks,
                                            disk_size=disk_size, placement=args.placement,
                                            durability=args.durability,
                                            viewservers=args.viewservers,
                                            etcd=[e for e in args.etcd.split(",") if e]))
    except BaseException:
        remove_new_files(args.dir, before)     # no half-made cluster left behind
        raise
    print(f"replfs: cluster in {cfg.dir}: view server"
          + ("s " if len(cfg.viewservers) > 1 else " ")
          + ", ".join(f"{v} on {cfg.ports[v]}" for v in cfg.viewservers)
          + (f" (views in etcd {', '.join(cfg.etcd)})" if cfg.etcd else "") + "; "
          + "; ".join(f"group {g}: " + ", ".join(f"{s} on {cfg.ports[s]}" for s in ss)
                      for g, ss in cfg.groups.items())
          + f"; directories placed by {cfg.placement}; updates answered once "
          + f"{cfg.durability} on both replicas (secret mode 0600)")
    return 0


def _init_nodes(args) -> int:
    """`init DIR --viewserver H:P --server [N=]H:P ...`: the description of a cluster over
    several machines and its secret, no arrays (each is made on its server's machine)."""
    from replfs.replication.nodes import parse_endpoint
    if not (args.server and args.viewserver):
        raise ReplfsError("a cluster over several machines needs both --viewserver "
                          "HOST:PORT and a --server [NAME=]HOST:PORT per server")
    _check_new_dir(args.dir)
    vss = [parse_endpoint(text, VIEWSERVER + (str(i) if i else ""), "--viewserver")
           for i, text in enumerate(args.viewserver)]
    servers = [parse_endpoint(text, f"s{i}", "--server") for i, text in enumerate(args.server)]
    cfg = ClusterConfig.create(args.dir, groups=args.groups, replicas=args.replicas,
                               disks=args.disks, disk_size=parse_size(args.size),
                               placement=args.placement, durability=args.durability,
                               viewserver=vss, servers=servers,
                               etcd=[e for e in args.etcd.split(",") if e])
    print(f"replfs: cluster description in {os.path.join(cfg.dir, CONFIG)}, secret in "
          f"{os.path.join(cfg.dir, 'secret')} (mode 0600): view server"
          f"{'s' if len(cfg.viewservers) > 1 else ''} at "
          + ", ".join(f"{v} {cfg.where(v)}" for v in cfg.viewservers)
          + (f" (views in etcd {', '.join(cfg.etcd)})" if cfg.etcd else "") + "; "
          + "; ".join(f"group {g}: " + ", ".join(f"{s} at {cfg.where(s)}" for s in ss)
                      for g, ss in cfg.groups.items()))
    print(f"replfs: next, copy both files into {cfg.dir} on every machine; there run "
          f"`replfs init {cfg.dir} --here S` and `replfs server {cfg.dir} S` for each "
          f"server S, `replfs viewserver {cfg.dir} --name V` on each view server V's, then "
          f"`replfs mount {cfg.dir} MNT` anywhere")
    return 0


def _check_new_dir(dirpath: str) -> None:
    from replfs.tools.mount_cmd import _holds_files
    if os.path.exists(os.path.join(dirpath, CONFIG)):
        raise ReplfsError(f"{dirpath} already holds a cluster; remove it first to start over")
    if os.path.exists(os.path.join(dirpath, "array.json")):
        raise ReplfsError(f"{dirpath} holds a replfs array (`replfs mkfs`); give init an "
                          f"empty or new directory")
    if _holds_files(dirpath):
        raise ReplfsError(f"{dirpath} is not empty; give init an empty or new directory")


def _init_here(dirpath: str, server: str) -> int:
    """`init DIR --here S`: make server S's array and filesystem in its data directory
    on this machine, from the description in DIR."""
    from replfs.tools.replica_array import make_server_array
    from replfs.tools.mount_cmd import _holds_files, remove_new_files
    cfg = ClusterConfig.load(dirpath)
    cfg.group_of(server)
    cfg.secret()
    d = cfg.server_dir(server)
    if _holds_files(d):
        raise ReplfsError(f"{d} is not empty (server {server} has its array already?); "
                          f"remove it first to make a new one")
    before = set(os.listdir(d)) if os.path.isdir(d) else None
    try:
        trio.run(lambda: make_server_array(cfg, server))
    except BaseException:
        remove_new_files(d, before)
        raise
    print(f"replfs: start it with `replfs server {cfg.dir} {server}` (it listens on "
          f"{cfg.where(server)})")
    return 0


def _new_secret(dirpath: str) -> int:
    from replfs.replication.config import write_secret
    from replfs.tools.cluster import Cluster
    cluster = Cluster(dirpath)
    running = [n for n in [*cluster.cfg.viewservers, "mount", *cluster.cfg.servers]
               if cluster.alive(n)]
    if running:
        raise ReplfsError(f"the cluster in {cluster.dir} is running ({', '.join(running)}); "
                          f"stop it with `replfs down {dirpath}` first")
    path = write_secret(cluster.dir)
    print(f"replfs: wrote a new secret in {path} (mode 0600)")
    return 0


# ---------------------------------------------------------------- daemons
def cmd_viewserver(args) -> int:
    from replfs.replication import wire
    from replfs.replication.viewserver import ViewService, run_viewserver
    from replfs.replication.viewstore import EtcdStore, FileStore
    _logging()
    cfg = ClusterConfig.load(args.dir)
    name = args.name
    if name not in cfg.viewservers:
        raise ReplfsError(f"no view server {name!r} in {cfg.dir} (view servers: "
                          f"{', '.join(cfg.viewservers)})")
    if cfg.etcd:
        secret = cfg.secret()

        async def dial(other: str):
            return await wire.connect(cfg.addr(name, other), secret, name)
        store = EtcdStore(cfg.etcd, cfg.etcd_prefix, name, dial=dial)
        log.info("%s: views in etcd (%s) under %s; standing by until elected", name,
                 ", ".join(cfg.etcd), cfg.etcd_prefix)
    else:
        store = FileStore(os.path.join(cfg.dir, "views.json"))
    _check_address(cfg, name)
    host, port = cfg.direct(name)

    def elected() -> ViewService:
        _take_faults(cfg, name)     # a standby was told of no fault since it started
        return ViewService(cfg.ping_interval, cfg.dead_pings)
    trio.run(_until_signal, lambda ts: run_viewserver(
        port, cfg.secret(), elected, store, host=host, name=name, task_status=ts))
    return 0


def cmd_server(args) -> int:
    from replfs.replication.server import ReplicaServer
    from replfs.tools.replica_array import open_replica_array
    name = args.server or args.name
    if not name or (args.server and args.name and args.server != args.name):
        raise ReplfsError("say which server to run: `replfs server DIR S` (S: s0, s1, ...)")
    cfg = ClusterConfig.load(args.dir)
    cfg.group_of(name)
    d = cfg.server_dir(name)
    if not os.path.exists(os.path.join(d, "array.json")):
        raise ReplfsError(f"{d} holds no array of server {name}; make it on this machine "
                          f"with `replfs init {cfg.dir} --here {name}`")
    _check_address(cfg, name)
    _logging()
    _take_faults(cfg, name)
    array = open_replica_array(cfg, name, d, checksum_cache(args))
    try:
        server = ReplicaServer(cfg, name, array)
        trio.run(_until_signal, lambda ts: server.run(task_status=ts))
    finally:
        array.close()
    return 0


def _check_address(cfg: ClusterConfig, node: str) -> None:
    """ReplfsError, in one line, if `node` cannot listen where the description says
    (another machine's address, a host name that does not resolve, a port in use)."""
    import errno
    import socket
    host, port = cfg.direct(node)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port,
                                                          type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the listener
            s.bind(addr)
    except OSError as exc:
        fix = (f"run it on the machine that has {host}, or correct its host in "
               f"{os.path.join(cfg.dir, CONFIG)}"
               if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
               else f"stop what holds the port, or give {node} another port in "
                    f"{os.path.join(cfg.dir, CONFIG)}")
        raise ReplfsError(f"{node} cannot listen on {cfg.where(node)} "
                          f"({exc.strerror or exc}); {fix}") from None


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
    if os.path.exists(os.path.join(args.dir, CONFIG)):
        _one_machine(ClusterConfig.load(args.dir))
        _clear_the_way(Cluster(args.dir))     # before the mount point check: a dead mount
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
    return _run_up(Cluster(cfg.dir), args)


def _one_machine(cfg: ClusterConfig) -> None:
    """ReplfsError unless every node of `cfg` is on this machine's loopback (what `up`
    can start)."""
    from replfs.replication.nodes import is_loopback
    if not cfg.one_machine:
        far = next(n for n, node in cfg.nodes.items()
                   if node.port is not None and not is_loopback(node.host))
        raise ReplfsError(f"the cluster in {cfg.dir} is spread over machines ({far} at "
                          f"{cfg.where(far)}); start each node on its own machine "
                          f"(`replfs viewserver {cfg.dir}`, `replfs server {cfg.dir} S`) "
                          f"and mount with `replfs mount {cfg.dir} MNT`")


def _run_up(cluster, args) -> int:
    """The foreground `up`: start every process, wait until every group is protected,
    mount, then supervise until a signal or the mount ends; always unmount and stop
    everything, and delete the run files, on the way out."""
    from replfs.tools.cluster import Supervisor, remove_run_files, write_run_state
    cfg = cluster.cfg
    mnt = os.path.abspath(args.mountpoint)
    state = dict(pid=os.getpid(), mountpoint=mnt, started=time.time())
    with open(cfg.pid_path("up"), "w") as f:
        f.write(f"{os.getpid()}\n")
    write_run_state(cfg, state)
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
        cluster.wait_protected(timeout=120, fail_fast=True)
        cluster.start("mount", ["mount", cfg.dir, mnt]
                      + (["--allow-other"] if args.allow_other else []))
        _wait_mounted(cluster, args.mountpoint)
        mounted[0] = True
        print(f"replfs: {cfg.dir} mounted on {args.mountpoint}; Ctrl-C unmounts and stops",
              flush=True)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
            args.ready_fd = None
        watch = Supervisor(cluster, [] if args.no_restart else [*cfg.viewservers, *cfg.servers],
                           state)
        while not stop[0]:
            time.sleep(0.2)
            if not cluster.alive("mount"):
                log.warning("the mount process exited; stopping the cluster")
                break
            watch.poll()
    except ReplfsError as exc:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"error: " + str(exc).encode())
        raise
    finally:
        unmount(mnt)
        cluster.stop_all()
        remove_run_files(cfg)
        print("replfs: unmounted and stopped", flush=True)
    return 0


def _wait_mounted(cluster, mnt: str, timeout: float = 30.0) -> None:
    wait_mounted(mnt, lambda: cluster.alive("mount"),
                 f"the mount process (log {cluster.cfg.log_dir()}/mount.log)", timeout)


def _clear_the_way(cluster) -> None:
    """Before `up` starts anything: ReplfsError if the cluster is already up or a
    process of it runs that no `replfs up` started (by hand, say); if a `replfs up` was
    killed (kill -9), stop what it left running, unmount its mount point and delete its
    run files, and say so in one line."""
    from replfs.tools.cluster import find_processes, read_run_state
    cfg = cluster.cfg
    found = find_processes(cluster.dir)
    ups = [f for f in found if f.name == "up"]
    if ups:
        raise ReplfsError(f"the cluster in {cfg.dir} is already up (`replfs up`, pid "
                          f"{ups[0].pid}); `replfs down {cfg.dir}` stops it")
    run = read_run_state(cfg)
    killed = run.get("pid") or cfg.read_pid("up")
    left = ({cfg.read_pid(n) for n in ["mount", *cfg.viewservers, *cfg.servers]} - {None}
            if killed else set())
    strangers = [f for f in found if f.pid not in left]
    if strangers:
        raise ReplfsError(
            f"{_names(strangers)} of the cluster in {cfg.dir} already "
            f"{'runs' if len(strangers) == 1 else 'run'}, not started by `replfs up`; "
            f"stop {'it' if len(strangers) == 1 else 'them'} (`replfs down {cfg.dir}` does) "
            f"and try again")
    if killed:
        what = _stop_leftovers(cluster, found, run)
        print(f"replfs: a `replfs up` of {cfg.dir} (pid {killed}) was killed; "
              + (f"cleaned up after it: {what}" if what else "it left nothing running"),
              flush=True)


def _names(found) -> str:
    return ", ".join(f"{f.name} (pid {f.pid})" for f in found)


def _stop_leftovers(cluster, found, run: dict) -> str:
    """Stop `found` (mount first, the view server last), unmount every mount point they
    and `run` name, delete the run files; what was done, for one line of output."""
    from replfs.tools.cluster import remove_run_files, stop_pids
    from replfs.tools.mountpoints import is_mounted
    rank = {"up": 0, "mount": 1, **{v: 3 for v in cluster.cfg.viewservers}}
    found = sorted(found, key=lambda f: (rank.get(f.name, 2), f.name))
    for r in sorted({rank.get(f.name, 2) for f in found}):
        stop_pids([f.pid for f in found if rank.get(f.name, 2) == r],
                  timeout=60 if r == 0 else 10, group=r != 0)
    cluster.stop_all()
    mnts = {run.get("mountpoint")} | {f.mountpoint for f in found if f.mountpoint}
    unmounted = []
    for m in sorted(m for m in mnts if m):
        if is_mounted(m):
            unmount(m)
            unmounted.append(m)
    remove_run_files(cluster.cfg)
    parts = []
    if found:
        parts.append(f"stopped {_names(found)}")
    if unmounted:
        parts.append(f"unmounted {', '.join(unmounted)}")
    return "; ".join(parts)


def cmd_down(args) -> int:
    """Stop `replfs up` (which unmounts and stops what it started), then whatever of
    the cluster still runs -- left by a killed `up`, or started by hand -- and unmount
    what is still mounted; one line says what was done, or that nothing was running."""
    from replfs.tools.cluster import Cluster, find_processes, read_run_state, stop_pids
    from replfs.tools.mountpoints import is_mounted
    cluster = Cluster(args.dir)
    cfg = cluster.cfg
    run = read_run_state(cfg)
    found = find_processes(cluster.dir)
    ups = [f for f in found if f.name == "up"]
    up_mnt = [f.mountpoint for f in ups if f.mountpoint] or [run.get("mountpoint")]
    stop_pids([f.pid for f in ups], timeout=60, group=False)   # it unmounts, stops all
    rest = [f for f in find_processes(cluster.dir) if f.name != "up"]
    dead_mount = not ups and any(m and is_mounted(m) for m in up_mnt)
    what = _stop_leftovers(cluster, rest, run)
    if ups:
        print(f"replfs: cluster {cfg.dir} stopped (`replfs up` pid {ups[0].pid}"
              + (f"; also {what}" if what else "") + ")")
    elif what:
        print(f"replfs: no `replfs up` of {cfg.dir} was running"
              + (" (it was killed)" if run or dead_mount else "") + f"; {what}")
    else:
        print(f"replfs: nothing was running in {cfg.dir}")
    return 0


# ---------------------------------------------------------------- status
def cmd_status(args) -> int:
    from replfs.tools.status_cmd import cmd_status as status
    return status(args)
