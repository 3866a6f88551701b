"""The local cluster launcher: start, watch and stop the processes of a cluster directory
(view server, replica servers, the FUSE client), each in its own session
(process group) with its pid in `DIR/run/NAME.pid` and its log in `DIR/logs/NAME.log`.

Used by `replfs up/down/status/fault`, by the tests and by the benchmarks.
"""

from __future__ import annotations

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
from replfs.replication.config import VIEWSERVER, ClusterConfig

log = logging.getLogger("replfs.cluster")
REPLFS = [sys.executable, "-m", "replfs.tools.cli"]


async def init_cluster(dirpath: str, *, groups: int = 2, replicas: int = 2, disks: int = 4,
                       disk_size: int = 128 * 2**20, placement: str = "spread",
                       durability: str = "written",
                       progress=print) -> ClusterConfig:
    """Write a new cluster in `dirpath`: config, secret, an array and a filesystem per
    replica, each made for the replica's group (its inode numbers carry the group); the
    filesystem leaves the replicated tail of the array outside it."""
    from replfs.fs.mkfs import mkfs
    from replfs.raid import create_array
    from replfs.replication import amo

    if os.path.exists(os.path.join(dirpath, "cluster.json")):
        raise ReplfsError(f"{dirpath} already holds a cluster; remove it first to start over")
    cfg = ClusterConfig.create(dirpath, groups=groups, replicas=replicas, disks=disks,
                               disk_size=disk_size, placement=placement,
                               durability=durability)
    for s in cfg.servers:
        group = cfg.group_of(s)
        array = create_array(cfg.server_dir(s), disks, disk_size)
        try:
            sb = await mkfs(_Shorter(array, array.nblocks - amo.TAIL_BLOCKS), group=group)
            await array.flush()
        finally:
            array.close()
        progress(f"replfs: {s} (group {group}): {disks}-disk RAID-5 array, filesystem of "
                 f"{sb.nblocks * 4096 // 2**20} MiB")
    return cfg


class _Shorter:
    """The first `nblocks` blocks of a device (mkfs leaves the rest alone)."""

    def __init__(self, device, nblocks: int):
        self.device = device
        self.block_size = device.block_size
        self.nblocks = nblocks

    async def read_block(self, n):
        return await self.device.read_block(n)

    async def read_blocks(self, start, count):
        return await self.device.read_blocks(start, count)

    async def write_blocks(self, blocks):
        if any(not 0 <= n < self.nblocks for n in blocks):
            raise ValueError("block beyond the filesystem")
        await self.device.write_blocks(blocks)

    async def flush(self):
        await self.device.flush()


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

    def start_viewserver(self):
        return self.start(VIEWSERVER, ["viewserver", self.dir])

    def start_server(self, name: str):
        return self.start(name, ["server", self.dir, "--name", name])

    def start_all(self) -> None:
        self.start_viewserver()
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
        names = ["mount", *self.cfg.servers, VIEWSERVER]
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

    def wait_until(self, pred, timeout: float = 30.0, what: str = "the cluster") -> dict:
        """Poll `status()` until `pred(status)`; raise ReplfsError on timeout or when a
        started process died."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(timeout=1.0)
            if pred(st):
                return st
            for name, proc in self.procs.items():
                if proc.poll() is not None and name == VIEWSERVER:
                    raise ReplfsError(f"{name} exited with {proc.returncode}; see "
                                      f"{self.cfg.log_dir()}/{name}.log")
            if time.monotonic() > deadline:
                raise ReplfsError(f"{what} not ready after {timeout:.0f} s: {view_line(st)}")
            time.sleep(0.1)

    def wait_protected(self, timeout: float = 60.0, group: int | None = None) -> dict:
        """Until the group (every group, by default) has a primary and an in-sync backup
        (view acknowledged)."""
        groups = list(self.cfg.groups) if group is None else [group]
        return self.wait_until(lambda st: all(protected(st, g) for g in groups), timeout,
                               "every group protected" if group is None
                               else f"a protected group {group}")

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
        if name == VIEWSERVER:
            out["viewserver"] = info
        else:
            out["servers"][name] = info
    async with trio.open_nursery() as nursery:
        for name in [VIEWSERVER, *cfg.servers]:
            nursery.start_soon(one, name)
    out["viewserver"] = out["viewserver"] or {}
    out["servers"] = {k: v or {} for k, v in out["servers"].items()}
    return out


def start_mounted_cluster(base: str, *, disk_size: int = 64 * 2**20,
                          groups: int = 2, placement: str = "spread"):
    """Init and start a cluster (`groups` groups of two replicas) in `base`/cluster and
    mount it on `base`/mnt, as `replfs up` would (for benchmarks: `replfs bench fs`
    compares it with the local mount). Returns (mountpoint, cluster, stop); `stop()`
    unmounts and stops every process (idempotent)."""
    from replfs.tools.mountpoints import unmount, wait_mounted

    cdir, mnt = os.path.join(base, "cluster"), os.path.join(base, "mnt")
    os.makedirs(mnt, exist_ok=True)
    trio.run(lambda: init_cluster(cdir, groups=groups, disk_size=disk_size,
                                  placement=placement, progress=lambda *a: None))
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
