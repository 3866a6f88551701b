"""The local cluster launcher: start, watch and stop the processes of a cluster directory
(view server, replica servers, the FUSE client), each in its own session
(process group) with its pid in `DIR/run/NAME.pid` and its log in `DIR/logs/NAME.log`.

Used by `replfs up/down/status/fault`, by the tests and by the benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import trio

from replfs.errors import ReplfsError
from replfs.replication import wire
from replfs.replication.config import DEFAULT_DISK_SIZE, VIEWSERVER, ClusterConfig

log = logging.getLogger("replfs.cluster")
REPLFS = [sys.executable, "-m", "replfs.tools.cli"]


async def init_cluster(dirpath: str, *, groups: int = 2, replicas: int = 2, disks: int = 4,
                       disk_size: int = DEFAULT_DISK_SIZE, placement: str = "spread",
                       durability: str = "written", viewservers: int = 1,
                       etcd: list[str] | None = None, progress=print) -> ClusterConfig:
    """Write a new cluster in `dirpath`: config, secret, an array and a filesystem per
    replica, each made for the replica's group (its inode numbers carry the group); the
    filesystem leaves the replicated tail of the array outside it."""
    if os.path.exists(os.path.join(dirpath, "cluster.json")):
        raise ReplfsError(f"{dirpath} already holds a cluster; remove it first to start over")
    cfg = ClusterConfig.create(dirpath, groups=groups, replicas=replicas, disks=disks,
                               disk_size=disk_size, placement=placement,
                               durability=durability, viewservers=viewservers, etcd=etcd)
    from replfs.tools.replica_array import make_server_array
    for s in cfg.servers:
        await make_server_array(cfg, s, progress)
    return cfg


def _is_ours(pid: int, dirpath: str) -> bool:
    try:
        cmd = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any("replfs" in c for c in cmd) and os.path.abspath(dirpath) in cmd


class Cluster:
    """The processes of one cluster directory."""

    def __init__(self, dirpath: str):
        self.cfg = ClusterConfig.load(dirpath)
        self.dir = self.cfg.dir
        self.procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- processes
    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        logf = open(os.path.join(self.cfg.log_dir(), f"{name}.log"), "ab")
        e = dict(os.environ)
        e.update(env or {})
        with logf:
            proc = subprocess.Popen([*REPLFS, *argv], stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=logf, start_new_session=True, env=e)
        with open(self.cfg.pid_path(name), "w") as f:
            f.write(f"{proc.pid}\n")
        self.procs[name] = proc
        return proc

    def start_viewserver(self, name: str = VIEWSERVER):
        return self.start(name, ["viewserver", self.dir, "--name", name])

    def start_server(self, name: str):
        return self.start(name, ["server", self.dir, "--name", name])

    def start_all(self) -> None:
        for v in self.cfg.viewservers:
            self.start_viewserver(v)
        for s in self.cfg.servers:
            self.start_server(s)

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        pid = self.cfg.read_pid(name)
        return pid if pid and _is_ours(pid, self.dir) else None

    def alive(self, name: str) -> bool:
        return self.pid(name) is not None

    def signal(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(name)
        if pid is None:
            raise ReplfsError(f"{name} is not running in {self.dir}")
        os.kill(pid, sig)
        if sig == signal.SIGKILL and name in self.procs:
            self.procs[name].wait(10)
        return pid

    def stop(self, name: str, timeout: float = 10.0) -> None:
        pid = self.pid(name)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGCONT)
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if name in self.procs:
            try:
                self.procs[name].wait(5)
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self) -> None:
        names = ["mount", *self.cfg.servers, *self.cfg.viewservers]
        for name in names:
            self.stop(name)
        for name in names:
            try:
                os.unlink(self.cfg.pid_path(name))
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------- queries
    def status(self, timeout: float = 2.0) -> dict:
        return trio.run(gather_status, self.cfg, timeout)

    def wait_until(self, pred, timeout: float = 30.0, what: str = "the cluster",
                   fail_fast: bool = False) -> dict:
        """Poll `status()` until `pred(status)`; raise ReplfsError on timeout or when the
        view servers (with `fail_fast`, any process this object started) died, with the
        reason from its exit status and log."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(timeout=1.0)
            if pred(st):
                return st
            vss = [self.procs[v] for v in self.cfg.viewservers if v in self.procs]
            no_vs = all(p.poll() is not None for p in vss)      # every view server died
            for name, proc in self.procs.items():
                if proc.poll() is not None and (fail_fast or name in self.cfg.viewservers
                                                and no_vs):
                    logpath = os.path.join(self.cfg.log_dir(), f"{name}.log")
                    raise ReplfsError(f"{name} {describe_exit(proc.returncode, logpath)} "
                                      f"(log {logpath})")
            if time.monotonic() > deadline:
                raise ReplfsError(f"{what} not ready after {timeout:.0f} s: {view_line(st)}")
            time.sleep(0.1)

    def wait_protected(self, timeout: float = 60.0, group: int | None = None,
                       fail_fast: bool = False) -> dict:
        """Until the group (every group, by default) has a primary and an in-sync backup
        (view acknowledged)."""
        groups = list(self.cfg.groups) if group is None else [group]
        return self.wait_until(lambda st: all(protected(st, g) for g in groups), timeout,
                               "every group protected" if group is None
                               else f"a protected group {group}", fail_fast)

    def wait_primary(self, timeout: float = 30.0, group: int = 0, not_: str | None = None) -> dict:
        def ok(st):
            v = st.get("viewserver", {}).get("groups", {}).get(str(group))
            return bool(v and v["primary"] and v["acked"] and v["primary"] != not_
                        and st["servers"].get(v["primary"], {}).get("serving"))
        return self.wait_until(ok, timeout, "a primary")


def protected(st: dict, group: int = 0) -> bool:
    v = st.get("viewserver", {}).get("groups", {}).get(str(group))
    return bool(v and v["primary"] and v["backup"] and v["acked"])


def view_line(st: dict) -> str:
    vs = st.get("viewserver") or {}
    parts = []
    for g, v in (vs.get("groups") or {}).items():
        parts.append(f"group {g}: view {v['view']} primary {v['primary'] or '-'} "
                     f"backup {v['backup'] or '-'}{'' if v['acked'] else ' (unacked)'}")
    return "; ".join(parts) or "no view yet"


async def _ask(addr, secret: bytes, timeout: float) -> dict | None:
    try:
        with trio.fail_after(timeout):
            ch = await wire.connect(addr, secret, "status")
            try:
                await ch.send(wire.StatusRequest())
                r = await ch.receive()
            finally:
                await ch.aclose()
        return r.info if isinstance(r, wire.StatusReply) else None
    except wire.CONN_ERRORS:
        return None


async def gather_status(cfg: ClusterConfig, timeout: float = 2.0) -> dict:
    """The view server's and every server's own report; a node that does not answer
    within `timeout` is None."""
    secret = cfg.secret()
    out = {"viewserver": None, "servers": {}}

    async def one(name):
        info = await _ask(cfg.direct(name), secret, timeout)
        if name not in cfg.viewservers:
            out["servers"][name] = info
        elif info:                  # the active one (standbys refuse)
            out["viewserver"] = info
    async with trio.open_nursery() as nursery:
        for name in [*cfg.viewservers, *cfg.servers]:
            nursery.start_soon(one, name)
    out["viewserver"] = out["viewserver"] or {}
    out["servers"] = {k: v or {} for k, v in out["servers"].items()}
    return out


def start_mounted_cluster(base: str, *, disk_size: int = 64 * 2**20,
                          groups: int = 2, placement: str = "spread", viewservers: int = 1,
                          etcd: list[str] | None = None):
    """Init and start a cluster (`groups` groups of two replicas; `viewservers` view
    server processes, the views in `etcd` where given) in `base`/cluster and mount it on
    `base`/mnt, as `replfs up` would (for benchmarks: `replfs bench fs` compares it with
    the local mount). Returns (mountpoint, cluster, stop); `stop()` unmounts and stops
    every process (idempotent)."""
    from replfs.tools.mountpoints import unmount, wait_mounted

    cdir, mnt = os.path.join(base, "cluster"), os.path.join(base, "mnt")
    os.makedirs(mnt, exist_ok=True)
    trio.run(lambda: init_cluster(cdir, groups=groups, disk_size=disk_size,
                                  placement=placement, viewservers=viewservers, etcd=etcd,
                                  progress=lambda *a: None))
    cluster = Cluster(cdir)

    def stop():
        try:
            unmount(mnt)
        finally:
            cluster.stop_all()
    try:
        cluster.start_all()
        cluster.wait_protected(timeout=60)
        proc = cluster.start("mount", ["mount", cdir, mnt])
        wait_mounted(mnt, lambda: proc.poll() is None,
                     f"the replicated mount (log {cdir}/logs/mount.log)")
    except BaseException:
        stop()
        raise
    return mnt, cluster, stop


# ---------------------------------------------------------------- what runs, whoever started it
# The subcommands whose processes belong to a cluster directory, and the name each one
# has in DIR/run/ (a server's is its --name).
_DAEMONS = ("up", "viewserver", "server", "mount")
_VALUE_OPTIONS = ("--name", "--ready-fd", "-o", "--options")


class Found:
    """A process of a cluster found by its command line: `name` (up, viewserver, mount,
    s0, ...), `pid`, `mountpoint` (for up and mount) and whether it has the `--daemon`
    flag (the short-lived parent of a detached `up`)."""

    def __init__(self, name: str, pid: int, mountpoint: str | None, daemon: bool):
        self.name, self.pid, self.mountpoint, self.daemon = name, pid, mountpoint, daemon

    def __repr__(self) -> str:
        return f"{self.name} (pid {self.pid})"


def _parse_cmdline(cmd: list[str], cwd: str) -> tuple[str, str, str | None, bool] | None:
    """(name, cluster dir, mountpoint, daemon) of a `replfs up|viewserver|server|mount`
    command line, paths made absolute against the process's `cwd`; None for anything
    else (`mount --local` included)."""
    start = None
    for i, c in enumerate(cmd[:4]):
        if c == "replfs.tools.cli" or os.path.basename(c) == "replfs":
            # the program itself, or a Python running it -- not a wrapper whose
            # arguments name it (`timeout 60 replfs up ...`, sudo, strace)
            if all(os.path.basename(x).startswith("python") or x.startswith("-")
                   for x in cmd[:i]):
                start = i + 1
            break
    if start is None:
        return None
    rest = [c for c in cmd[start:]]
    while rest and rest[0].startswith("-"):       # `replfs --debug up ...`
        rest.pop(0)
    if not rest or rest[0] not in _DAEMONS:
        return None
    sub, rest = rest[0], rest[1:]
    positional, name, daemon, i = [], None, False, 0
    while i < len(rest):
        c = rest[i]
        if c in _VALUE_OPTIONS:
            if c == "--name" and i + 1 < len(rest):
                name = rest[i + 1]
            i += 2
            continue
        if c.startswith("--name="):
            name = c.split("=", 1)[1]
        elif c == "--local":
            return None
        elif c == "--daemon":
            daemon = True
        elif not c.startswith("-"):
            positional.append(c)
        i += 1
    if not positional:
        return None
    absolute = [os.path.realpath(os.path.join(cwd, p)) for p in positional[:2]]
    if sub == "server":
        name = name or (positional[1] if len(positional) > 1 else None)
        if not name:
            return None
        return name, absolute[0], None, daemon
    if sub == "viewserver":
        return name or VIEWSERVER, absolute[0], None, daemon
    return sub, absolute[0], absolute[1] if len(absolute) > 1 else None, daemon


def find_processes(dirpath: str) -> list[Found]:
    """Every `replfs up|viewserver|server|mount` process of the cluster in `dirpath`,
    however it was started (by `up`, by a test, by hand with a relative path), but not
    this process nor its parent (the waiting half of `up --daemon`)."""
    want = os.path.realpath(dirpath)
    me = {os.getpid(), os.getppid()}
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            cmd, cwd = p.info["cmdline"], p.info["cwd"] or "/"
            if not cmd or p.info["pid"] in me or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if not any("replfs" in c for c in cmd[:4]):
                continue
            parsed = _parse_cmdline(cmd, cwd)
        except (psutil.Error, OSError):
            continue
        if parsed and parsed[1] == want:
            out.append(Found(parsed[0], p.info["pid"], parsed[2], parsed[3]))
    return sorted(out, key=lambda f: f.pid)


def stop_pids(pids: list[int], timeout: float = 10.0, group: bool = True) -> None:
    """SIGTERM every pid at once (its process group when it leads one and `group`, as
    every process `Cluster` starts does), SIGKILL what still runs after `timeout`;
    return once all are gone."""
    procs = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)      # a frozen (SIGSTOP) process must see the TERM
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
            procs.append(psutil.Process(pid))
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    _, alive = psutil.wait_procs(procs, timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, 5)


def stop_pid(pid: int, timeout: float = 10.0, group: bool = True) -> None:
    stop_pids([pid], timeout, group)


# ---------------------------------------------------------------- up's own state
RUN_STATE = "up.json"


def run_state_path(cfg: ClusterConfig) -> str:
    return os.path.join(cfg.run_dir(), RUN_STATE)


def read_run_state(cfg: ClusterConfig) -> dict:
    """What the last `replfs up` wrote in DIR/run/up.json: {pid, mountpoint, started,
    restarts: {name: n}, given_up: {name: reason}}; {} when there is none."""
    try:
        with open(run_state_path(cfg)) as f:
            st = json.load(f)
        return st if isinstance(st, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def write_run_state(cfg: ClusterConfig, st: dict) -> None:
    path = run_state_path(cfg)
    with open(path + ".tmp", "w") as f:
        json.dump(st, f)
    os.replace(path + ".tmp", path)


def remove_run_files(cfg: ClusterConfig) -> None:
    """Delete every pid file and up.json (nothing of the cluster runs any more)."""
    d = cfg.run_dir()
    for name in os.listdir(d):
        if name.endswith(".pid") or name.startswith(RUN_STATE):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass


def last_log_line(path: str) -> str:
    """The last line of a log that says something (an exception's message, an error),
    without the log's timestamp prefix; "" when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        s = line.strip()
        if not s or line[:1].isspace() or s.startswith(("Traceback", "+-", "|", "^", "~")):
            continue
        parts = s.split(" ", 4)
        if len(parts) == 5 and parts[3] in ("INFO", "WARNING", "ERROR", "CRITICAL"):
            s = parts[4]
        return s[:300]
    return ""


def describe_exit(returncode: int | None, logpath: str) -> str:
    """'exited with code 1: <last log line>' or 'killed by SIGKILL'."""
    if returncode is None:
        how = "exited"
    elif returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exited with code {returncode}"
    line = last_log_line(logpath) if returncode is None or returncode > 0 else ""
    return f"{how}: {line}" if line else how


class Supervisor:
    """What `replfs up` does while it runs: restart a server (or the view server) that
    died, after a backoff that doubles each time it dies again soon after a start
    (BACKOFF seconds), and give up on it after len(BACKOFF) such restarts, recording
    why in DIR/run/up.json (which `replfs status` shows). A process that stayed up
    STABLE seconds starts with a clean slate."""

    BACKOFF = (1.0, 2.0, 4.0, 8.0)
    STABLE = 30.0

    def __init__(self, cluster: "Cluster", names: list[str], state: dict):
        self.cluster = cluster
        self.names = names
        self.state = state
        state.setdefault("restarts", {})
        state.setdefault("given_up", {})
        now = time.monotonic()
        self.started = {n: now for n in names}
        self.quick_deaths = {n: 0 for n in names}
        self.dead_since: dict[str, float] = {}

    def _exit_reason(self, name: str) -> str:
        proc = self.cluster.procs.get(name)
        rc = proc.poll() if proc is not None else None
        return describe_exit(rc, os.path.join(self.cluster.cfg.log_dir(), f"{name}.log"))

    def poll(self, now: float | None = None) -> None:
        """Look at every supervised process once; restart or give up as due."""
        now = time.monotonic() if now is None else now
        for name in self.names:
            if name in self.state["given_up"]:
                continue
            if self.cluster.alive(name):
                continue
            if name not in self.dead_since:
                self.dead_since[name] = now
                if now - self.started[name] >= self.STABLE:
                    self.quick_deaths[name] = 0
                self.quick_deaths[name] += 1
                reason = self._exit_reason(name)
                self.state.setdefault("last_exit", {})[name] = reason
                if self.quick_deaths[name] > len(self.BACKOFF):
                    why = (f"gave up after {len(self.BACKOFF)} restarts: it {reason}")
                    log.error("%s %s", name, why)
                    self.state["given_up"][name] = why
                    write_run_state(self.cluster.cfg, self.state)
                    continue
                log.warning("%s %s; restarting it in %.0f s", name, reason,
                            self.BACKOFF[self.quick_deaths[name] - 1])
                write_run_state(self.cluster.cfg, self.state)
            if now - self.dead_since[name] >= self.BACKOFF[self.quick_deaths[name] - 1]:
                del self.dead_since[name]
                self.started[name] = now
                self.state["restarts"][name] = self.state["restarts"].get(name, 0) + 1
                if name in self.cluster.cfg.viewservers:
                    self.cluster.start_viewserver(name)
                else:
                    self.cluster.start_server(name)
                write_run_state(self.cluster.cfg, self.state)
