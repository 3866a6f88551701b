"""`replfs raid ... --server S` and `fault fail-disk --server S`: the array of a running
server, operated through that server (replication/arrayops.py) while it keeps serving.

The target is a cluster directory (or a mount of the cluster) with `--server S`, or a
server's own array directory (DIR/S) that its running server holds: then the command goes to S instead of refusing
("the array is in use"). A rebuild or scrub runs in the background inside S; the
command waits for it with a progress bar (Ctrl-C stops the waiting, not the job), or
returns at once with `--no-wait`.
"""

from __future__ import annotations

import os
import sys
import time

import trio

from replfs.errors import ReplfsError

ASK_TIMEOUT = 30.0      # a rebuild's start may fsync the array first
POLL = 0.5


def target(args) -> tuple[object, str] | None:
    """(cluster config, server) when the command goes to a running server, None when it
    opens the array itself. ReplfsError for a `--server` that does not fit DIR."""
    from replfs.replication.config import ClusterConfig
    server = getattr(args, "server", None)
    d = os.path.abspath(args.dir)
    mounted = cluster_of_mount(d)
    if mounted is not None:
        if not server:
            cfg = ClusterConfig.load(mounted)
            raise ReplfsError(f"{args.dir} is a mount of the cluster {mounted}: say whose "
                              f"array with --server S (servers: {', '.join(cfg.servers)})")
        d = mounted
    if server:
        if not os.path.exists(os.path.join(d, "cluster.json")) and os.path.exists(
                os.path.join(d, "array.json")):
            base = os.path.dirname(d)
            if os.path.basename(d) != server or not os.path.exists(
                    os.path.join(base, "cluster.json")):
                raise ReplfsError(f"{args.dir} is an array, not a cluster: give the cluster "
                                  f"directory with --server {server}, or drop --server")
            d = base
        cfg = ClusterConfig.load(d)
        cfg.group_of(server)            # names the servers when it is not one
        return cfg, server
    base, name = os.path.split(d)
    if not os.path.exists(os.path.join(base, "cluster.json")) or not _held(d):
        return None
    cfg = ClusterConfig.load(base)
    if name not in cfg.servers:
        return None
    return cfg, name


def cluster_of_mount(path: str) -> str | None:
    """The cluster directory mounted on `path` (a `replfs mount`), or None."""
    import psutil
    for p in psutil.disk_partitions(all=True):
        if p.mountpoint == path and p.fstype == "fuse.replfs" and os.path.exists(
                os.path.join(p.device, "cluster.json")):
            return p.device
    return None


def _held(arraydir: str) -> bool:
    """Whether a process holds the array (its lock file is locked)."""
    import fcntl
    path = os.path.join(arraydir, "array.lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def ask(cfg, server: str, action: str, **params) -> dict:
    """Send `action` to `server`; its ArrayOpReply's info. ReplfsError when the server
    cannot be reached or refuses (with its reason)."""
    from replfs.replication import wire
    from replfs.replication.arrayops import ArrayOp, ArrayOpReply

    async def go():
        with trio.fail_after(ASK_TIMEOUT):
            ch = await wire.connect(cfg.direct(server), cfg.secret(), "raid")
            try:
                await ch.send(ArrayOp(action, {k: v for k, v in params.items()
                                                    if v is not None}))
                return await ch.receive()
            finally:
                await ch.aclose()
    try:
        r = trio.run(go)
    except (OSError, trio.TooSlowError, *wire.CONN_ERRORS) as exc:
        raise ReplfsError(f"server {server} of {cfg.dir} does not answer ({exc or 'timeout'});"
                          f" is it running? (`replfs status {cfg.dir}`)", exit_code=4) from None
    if not isinstance(r, ArrayOpReply):
        raise ReplfsError(f"server {server} answered {r.TAG} to {action}: an older replfs?")
    if r.error:
        raise ReplfsError(f"{server}: {r.error}")
    return r.info


def job_line(job: dict | None) -> str:
    """One line on a background job, for `raid status` and `replfs status`."""
    if not job:
        return "no rebuild or scrub has run since the server started"
    what = f"rebuild of disk {job['disk']}" if job["kind"] == "rebuild" else "scrub"
    line = f"{what}: {job['state']}, {job['progress']:.1%}"
    if job["state"] in ("running", "paused"):
        rate = job.get("bytes_per_sec") or 0
        if rate:
            line += f" at {rate / 2**20:.0f} MiB/s"
        if job.get("eta_seconds") is not None and job["state"] == "running":
            line += f", {_duration(job['eta_seconds'])} left"
        if job.get("throttled"):
            line += " (held to its minimum speed while serving)"
    if job.get("error"):
        line += f": {job['error']}"
    return line


def _duration(secs: float) -> str:
    secs = int(secs)
    return f"{secs // 60} min {secs % 60} s" if secs >= 60 else f"{secs} s"


def wait(cfg, server: str, kind: str) -> dict:
    """Follow the server's job with a progress bar until it ends; its last status."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    console = Console(stderr=True)
    with Progress(TextColumn(f"[bold]{kind} on {server}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.description}"), console=console) as prog:
        task = prog.add_task("", total=1.0)
        try:
            while True:
                job = ask(cfg, server, "status").get("job") or {}
                prog.update(task, completed=job.get("progress", 0),
                            description=job_line(job).split(", ", 1)[-1])
                if job.get("state") not in ("running", "paused"):
                    return job
                time.sleep(POLL)
        except KeyboardInterrupt:
            print(f"\nthe {kind} goes on in {server}; follow it with `replfs raid status "
                  f"{cfg.dir} --server {server}`, stop it with `replfs raid cancel "
                  f"{cfg.dir} --server {server}`", file=sys.stderr)
            raise SystemExit(130) from None


def finished(server: str, job: dict) -> int:
    """Print how a job ended; the exit code."""
    print(f"{server}: {job_line(job)}")
    res = job.get("result") or {}
    if job["state"] != "done":
        return 1
    if job["kind"] == "scrub":
        repaired = sum((res.get("cksum_repaired") or {}).values())
        print(f"  {res.get('blocks_checked', 0)} blocks checked, {repaired} checksum errors "
              f"repaired, {res.get('parity_repaired', 0)} parity blocks rewritten, "
              f"{res.get('unrecoverable', 0)} unrecoverable here")
        lost = res.get("lost_blocks") or []
        if res.get("unrecoverable"):
            print(f"  {res.get('healed', 0)} healed from the other replica, {len(lost)} lost "
                  f"on both (reads of them give EIO; `replfs status` names their files)")
        return 1 if lost else 0
    if res.get("lost_blocks"):
        print(f"  {res['lost_blocks']} blocks could not be rebuilt (damaged on another disk "
              f"too)")
        return 1
    return 0
