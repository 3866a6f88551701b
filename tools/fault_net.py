"""Replication faults for `replfs fault` (registered into tools/fault.py's FAULTS):

- `kill DIR --server S [--signal KILL|STOP|CONT|TERM]`: signal one server (default kill -9);
- `partition DIR A B`: cut the network between nodes A and B (vs, s0, s1, client) in both
  directions;
- `loss DIR A B --request P --reply Q`: drop frames from A to B with probability P and
  from B to A with probability Q;
- `heal DIR`: remove every partition and loss;
- `crash-at DIR --server S NAME[:N]`: arm a named crash point in a running server.

Network faults are injected by each process into its own connections (wire.NetFaults):
the command writes the new state to DIR/faults.json (which a process reads when it
starts), then sends it (SetFaults) to every running node whose faults change and waits
until each has applied it. The client (the FUSE mounts) is never told: its peers, which
listen, enforce the faults for it.
"""

from __future__ import annotations

import signal

import trio

from replfs.errors import ReplfsError

NODES_HELP = "a node: vs (view server), client (the mounts), or a server name (s0, s1, ...)"
APPLY_TIMEOUT = 5.0


def _cluster(dirpath: str):
    from replfs.tools.cluster import Cluster
    return Cluster(dirpath)


def _check_nodes(cfg, a: str, b: str) -> None:
    from replfs.replication.config import CLIENT
    known = {*cfg.viewservers, CLIENT, *cfg.servers}
    for n in (a, b):
        if n not in known:
            raise ReplfsError(f"no node {n!r} in {cfg.dir} (nodes: {', '.join(sorted(known))})")
    if a == b:
        raise ReplfsError(f"a network fault is between two different nodes, not {a} and {a}")


def _involving(faults: dict, node: str) -> tuple:
    """The part of `faults` that `node` enforces."""
    return (sorted(sorted(p) for p in faults["partitions"] if node in p),
            sorted((k, sorted(v.items())) for k, v in faults["loss"].items()
                   if node in k.split(">")))


def apply_faults(cluster, change, timeout: float = APPLY_TIMEOUT) -> dict[str, str]:
    """Edit the cluster's network faults with `change(faults)` (read_faults's shape), write
    them, and tell every running node whose faults changed; returns {node: "applied",
    "down" or "standing by"} once each has applied them (a node down reads them when it
    starts, a view server standing by when it is elected).
    ReplfsError if a running node does not answer within `timeout`."""
    cfg = cluster.cfg
    try:
        before, damaged = cfg.read_faults(), False
    except ReplfsError:             # start from none, and tell every node
        before, damaged = dict(generation=0, partitions=[], loss={}), True
    after = dict(generation=before["generation"], partitions=list(before["partitions"]),
                 loss=dict(before["loss"]))
    change(after)
    gen = cfg.write_faults(after)
    nodes = [n for n in [*cfg.viewservers, *cfg.servers]
             if damaged or _involving(before, n) != _involving(after, n)]
    return trio.run(_tell, cluster, after, gen, nodes, timeout)


async def _tell(cluster, faults: dict, gen: int, nodes: list[str],
                timeout: float) -> dict[str, str]:
    from replfs.replication import wire
    cfg = cluster.cfg
    secret = cfg.secret()
    done: dict[str, str] = {}
    why: dict[str, str] = {}

    async def one(node: str) -> None:
        while True:
            try:
                ch = await wire.connect(cfg.direct(node), secret, "fault")
                try:
                    await ch.send(wire.SetFaults(gen, faults["partitions"], faults["loss"],
                                                 node))
                    r = await ch.receive()
                finally:
                    await ch.aclose()
            except OSError as exc:      # refused: down, or not listening yet
                if not cluster.alive(node):
                    done[node] = "down"
                    return
                if node in cfg.viewservers and len(cfg.viewservers) > 1:
                    done[node] = "standing by"      # it reads them once elected
                    return
                why[node] = str(exc)
            except wire.CONN_ERRORS as exc:
                why[node] = f"{type(exc).__name__}: {exc}"
            else:
                if isinstance(r, wire.FaultsApplied) and r.generation == gen:
                    done[node] = "applied"
                    return
                why[node] = f"answered {r.TAG}"
            await trio.sleep(0.05)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for n in nodes:
                nursery.start_soon(one, n)
    late = [n for n in nodes if n not in done]
    if late:
        stopped = [n for n in late if _stopped(cluster, n)]
        raise ReplfsError(
            f"{', '.join(late)} did not apply the network faults within {timeout:.0f} s"
            + (f" ({', '.join(stopped)} stopped: SIGCONT it, then repeat the command)"
               if stopped else
               f" ({'; '.join(f'{n}: {why[n]}' for n in late if n in why) or 'no answer'}; "
               f"see {cfg.log_dir()})")
            + f"; {cfg.faults_path()} holds them for the next start")
    return done


def _stopped(cluster, node: str) -> bool:
    import psutil
    pid = cluster.pid(node)
    try:
        return pid is not None and psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _told(done: dict[str, str]) -> str:
    up = [n for n, s in done.items() if s == "applied"]
    down = [n for n, s in done.items() if s == "down"]
    standby = [n for n, s in done.items() if s == "standing by"]
    parts = ([f"applied by {', '.join(up)}"] if up else []) + \
        ([f"{', '.join(down)} down: at its start"] if down else []) + \
        ([f"{', '.join(standby)} standing by: once elected"] if standby else [])
    return f" ({'; '.join(parts)})" if parts else ""


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
    cluster = _cluster(args.dir)
    _check_nodes(cluster.cfg, args.a, args.b)

    def change(f):
        if not any({args.a, args.b} == set(p) for p in f["partitions"]):
            f["partitions"].append([args.a, args.b])
    done = apply_faults(cluster, change)
    print(f"replfs: cut {args.a} <-> {args.b}{_told(done)}")
    return 0


def _run_loss(args) -> int:
    cluster = _cluster(args.dir)
    _check_nodes(cluster.cfg, args.a, args.b)
    for p in (args.request, args.reply):
        if not 0 <= p <= 1:
            raise ReplfsError(f"a probability is between 0 and 1, not {p}")

    def change(f):
        f["loss"].pop(f"{args.b}>{args.a}", None)
        f["loss"][f"{args.a}>{args.b}"] = dict(request=args.request, reply=args.reply)
    done = apply_faults(cluster, change)
    print(f"replfs: dropping {args.request:.0%} of frames {args.a} -> {args.b} and "
          f"{args.reply:.0%} of {args.b} -> {args.a}{_told(done)}")
    return 0


def _run_heal(args) -> int:
    cluster = _cluster(args.dir)

    def change(f):
        f["partitions"] = []
        f["loss"] = {}
    done = apply_faults(cluster, change)
    print(f"replfs: network healed{_told(done)}")
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
