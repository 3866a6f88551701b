"""Replication faults for `replfs fault` (registered into tools/fault.py's FAULTS):

- `kill DIR --server S [--signal KILL|STOP|CONT|TERM]`: signal one server (default kill -9);
- `partition DIR A B`: cut the network between nodes A and B (vs, s0, s1, client) in both
  directions, through the cluster's fault proxy;
- `loss DIR A B --request P --reply Q`: drop frames from A to B with probability P and
  from B to A with probability Q;
- `heal DIR`: remove every partition and loss;
- `crash-at DIR --server S NAME[:N]`: arm a named crash point in a running server.
"""

from __future__ import annotations

import os
import signal
import time

from replfs.errors import ReplfsError

NODES_HELP = "a node: vs (view server), client (the mounts), or a server name (s0, s1, ...)"


def _cluster(dirpath: str):
    from replfs.tools.cluster import Cluster
    return Cluster(dirpath)


def _check_nodes(cfg, *nodes: str) -> None:
    from replfs.replication.config import CLIENT, VIEWSERVER
    known = {VIEWSERVER, CLIENT, *cfg.servers}
    for n in nodes:
        if n not in known:
            raise ReplfsError(f"no node {n!r} in {cfg.dir} (nodes: {', '.join(sorted(known))})")
    if not cfg.proxy:
        raise ReplfsError(f"the cluster in {cfg.dir} runs without the fault proxy "
                          f"(made with --no-proxy): network faults are unavailable")


def apply_faults(cfg, change, timeout: float = 5.0) -> None:
    """Edit the proxy's fault state with `change(faults)` and wait until it applied it."""
    from replfs.replication.proxy import applied_path, read_faults, write_faults
    faults = read_faults(cfg)
    change(faults)
    gen = write_faults(cfg, faults)
    pid = _cluster(cfg.dir).pid("proxy")
    if pid is None:
        raise ReplfsError(f"the fault proxy of {cfg.dir} is not running (is the cluster up?)")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(applied_path(cfg)) as f:
                if int(f.read().strip() or 0) >= gen:
                    return
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise ReplfsError(f"the fault proxy (pid {pid}) did not apply the change within "
                              f"{timeout:.0f} s; see {cfg.log_dir()}/proxy.log")
        time.sleep(0.02)


def _run_kill(args) -> int:
    cluster = _cluster(args.dir)
    cluster.cfg.group_of(args.server)
    sig = getattr(signal, f"SIG{args.signal.upper()}", None)
    if sig is None:
        raise ReplfsError(f"unknown signal {args.signal!r} (KILL, STOP, CONT, TERM)")
    pid = cluster.signal(args.server, sig)
    print(f"replfs: sent SIG{args.signal.upper()} to {args.server} (pid {pid})")
    return 0


def _run_partition(args) -> int:
    cfg = _cluster(args.dir).cfg
    _check_nodes(cfg, args.a, args.b)

    def change(f):
        if not any({args.a, args.b} == set(p) for p in f["partitions"]):
            f["partitions"].append([args.a, args.b])
    apply_faults(cfg, change)
    print(f"replfs: cut {args.a} <-> {args.b}")
    return 0


def _run_loss(args) -> int:
    cfg = _cluster(args.dir).cfg
    _check_nodes(cfg, args.a, args.b)
    for p in (args.request, args.reply):
        if not 0 <= p <= 1:
            raise ReplfsError(f"a probability is between 0 and 1, not {p}")

    def change(f):
        f["loss"][f"{args.a}>{args.b}"] = dict(request=args.request, reply=args.reply)
    apply_faults(cfg, change)
    print(f"replfs: dropping {args.request:.0%} of frames {args.a} -> {args.b} and "
          f"{args.reply:.0%} of {args.b} -> {args.a}")
    return 0


def _run_heal(args) -> int:
    cfg = _cluster(args.dir).cfg

    def change(f):
        f["partitions"] = []
        f["loss"] = {}
    apply_faults(cfg, change)
    print("replfs: network healed")
    return 0


def _run_crash_at(args) -> int:
    import trio

    from replfs.replication import wire
    cluster = _cluster(args.dir)
    cfg = cluster.cfg
    cfg.group_of(args.server)

    async def go():
        with trio.fail_after(5):
            ch = await wire.connect(cfg.direct(args.server), cfg.secret(), "fault")
            try:
                await ch.send(wire.CrashAt(args.point))
                return await ch.receive()
            finally:
                await ch.aclose()
    try:
        r = trio.run(go)
    except (trio.TooSlowError, *wire.CONN_ERRORS) as exc:
        raise ReplfsError(f"{args.server} did not answer ({exc}); is the cluster up? "
                          f"(`replfs status {args.dir}`)") from None
    if not isinstance(r, wire.StatusReply):
        raise ReplfsError(f"{args.server} answered {r.TAG}")
    print(f"replfs: {args.server} will crash (exit 77) at {args.point}")
    return 0


def _register_crash_at(fsub) -> None:
    p = fsub.add_parser("crash-at", help="arm a named crash point in a running server")
    p.add_argument("dir", help="cluster directory")
    p.add_argument("--server", required=True, help="which server (s0, s1, ...)")
    p.add_argument("point", help="NAME[:N]: crash the N-th time it passes NAME "
                                 "(e.g. 2pc.coord.logged, 2pc.part.prepared)")
    p.set_defaults(func=_run_crash_at)


def _register_kill(fsub) -> None:
    p = fsub.add_parser("kill", help="kill (or stop/continue) one replica server")
    p.add_argument("dir", help="cluster directory")
    p.add_argument("--server", required=True, help="server name (s0, s1, ...)")
    p.add_argument("--signal", default="KILL", help="KILL (default), STOP, CONT or TERM")
    p.set_defaults(func=_run_kill)


def _register_partition(fsub) -> None:
    p = fsub.add_parser("partition", help="cut the network between two nodes")
    p.add_argument("dir", help="cluster directory")
    p.add_argument("a", help=NODES_HELP)
    p.add_argument("b", help=NODES_HELP)
    p.set_defaults(func=_run_partition)


def _register_loss(fsub) -> None:
    p = fsub.add_parser("loss", help="drop frames between two nodes at random")
    p.add_argument("dir", help="cluster directory")
    p.add_argument("a", help=NODES_HELP)
    p.add_argument("b", help=NODES_HELP)
    p.add_argument("--request", type=float, default=0.1, help="drop probability A -> B")
    p.add_argument("--reply", type=float, default=0.2, help="drop probability B -> A")
    p.set_defaults(func=_run_loss)


def _register_heal(fsub) -> None:
    p = fsub.add_parser("heal", help="remove every partition and loss")
    p.add_argument("dir", help="cluster directory")
    p.set_defaults(func=_run_heal)


FAULTS = [_register_kill, _register_partition, _register_loss, _register_heal, _register_crash_at]
