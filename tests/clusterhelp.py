"""Helpers for tests of a real replicated cluster: real processes on 127.0.0.1, each in
its own process group; everything stopped and unmounted even when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import trio

from mounthelp import force_unmount, is_mounted
from replfs.replication import amo
from replfs.replication.config import ClusterConfig
from replfs.tools.cluster import Cluster, init_cluster

DISK_SIZE = 32 * 2**20


def make_cluster(path: Path, disk_size: int = DISK_SIZE, *, groups: int = 2,
                 placement: str = "spread", durability: str = "written",
                 viewservers: int = 1, etcd: list[str] | None = None) -> Cluster:
    trio.run(lambda: init_cluster(str(path), groups=groups, disk_size=disk_size,
                                  placement=placement, durability=durability,
                                  viewservers=viewservers, etcd=etcd,
                                  progress=lambda *a: None))
    return Cluster(str(path))


class Running:
    """A started cluster with (optionally) its FUSE client mounted. `placement` "parent"
    keeps every directory in group 0 (for tests of replication, not of two-phase
    commit)."""

    def __init__(self, path: Path, mnt: Path, *, groups: int = 2, placement: str = "spread",
                 durability: str = "written", viewservers: int = 1,
                 etcd: list[str] | None = None):
        self.cluster = make_cluster(path, groups=groups, placement=placement,
                                    durability=durability, viewservers=viewservers,
                                    etcd=etcd)
        self.cfg: ClusterConfig = self.cluster.cfg
        self.mnt = mnt

    def start(self, mount: bool = True) -> "Running":
        self.cluster.start_all()
        try:
            self.cluster.wait_protected(timeout=60)
        except Exception:
            self.dump_stacks()
            raise
        if mount:
            self.mount()
        return self

    def mount(self, mnt: Path | None = None, name: str = "mount") -> None:
        """Start a `replfs mount` of the cluster (process `name`) on `mnt` (default: the
        cluster's own mount point) and wait until it is mounted."""
        mnt = self.mnt if mnt is None else mnt
        mnt.mkdir(parents=True, exist_ok=True)
        proc = self.cluster.start(name, ["mount", self.cfg.dir, str(mnt)])
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, f"{name} exited: {self.log(name)}"
            assert time.monotonic() < deadline, f"{mnt} not mounted after 30 s"
            time.sleep(0.05)

    def unmount(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, timeout=30)
        self.cluster.stop("mount")
        force_unmount(self.mnt)

    def stop(self) -> None:
        try:
            self.unmount()
        finally:
            self.cluster.stop_all()
            for proc in self.cluster.procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            force_unmount(self.mnt)

    def dump_stacks(self) -> None:
        """Every server writes its threads' stacks to its log (faulthandler, SIGUSR1)."""
        for s in self.cfg.servers:
            pid = self.cluster.pid(s)
            if pid:
                os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)

    def log(self, name: str) -> str:
        p = Path(self.cfg.log_dir()) / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def primary(self, group: int = 0) -> str:
        return self.view(group)["primary"]

    def view(self, group: int = 0) -> dict:
        return self.cluster.status()["viewserver"]["groups"][str(group)]

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=self.mnt,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"workload failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r


def compare_replicas(cfg: ClusterConfig) -> tuple[dict, int]:
    """With the cluster stopped: ({server: [blocks that differ from its group's first
    server's]}, number of blocks compared), for every server but each group's first, over
    every block that group's first server has allocated (metadata included, the log
    excluded) and the replicated tail (at-most-once table, 2PC decisions)."""
    from replfs.fs.layout import Superblock
    from replfs.raid import open_array

    async def blocks_of(server):
        array = open_array(cfg.server_dir(server))
        try:
            sb = Superblock.unpack(await array.read_block(0))
            data = {}
            bmap = b"".join([await array.read_block(sb.bmap_start + i) for i in range(sb.bmap_blocks)])
            lo, hi = sb.log_start, sb.log_start + sb.log_blocks
            wanted = [b for b in range(sb.nblocks) if bmap[b] and not lo <= b < hi]
            wanted += list(amo.replicated_tail(array.nblocks))
            for b in wanted:
                data[b] = await array.read_block(b)
            return data
        finally:
            array.close()

    async def go():
        out, compared = {}, 0
        for servers in cfg.groups.values():
            ref = await blocks_of(servers[0])
            compared += len(ref)
            for s in servers[1:]:
                other = await blocks_of(s)
                out[s] = sorted(b for b in set(ref) | set(other) if ref.get(b) != other.get(b))
        return out, compared
    return trio.run(go)


def followers(cfg: ClusterConfig) -> list[str]:
    """Every server but each group's first (the keys of compare_replicas's answer)."""
    return [s for ss in cfg.groups.values() for s in ss[1:]]


def done_after(progress: Path, t: float) -> int:
    """Operations a writer logged (`INDEX MONOTONIC-TIME` lines in `progress`) as finished
    after monotonic time `t`."""
    if not progress.exists():
        return 0
    return sum(1 for ln in progress.read_text().splitlines()
               if ln.count(" ") == 1 and float(ln.split()[1]) > t)


def wait_for(pred, timeout: float, what: str, poll: float = 0.05):
    """`pred()`'s first true value, polled until `timeout` s (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(poll)


def read_offline(server_dir: str, name: bytes) -> bytes:
    """The file `name` in the root of the stopped server's filesystem (its array, opened
    here and recovered)."""
    from replfs.fs.mkfs import open_fs
    from replfs.raid import open_array

    async def go():
        array = open_array(server_dir)
        try:
            fs = await open_fs(array, reclaim=False)
            try:
                attr = await fs.lookup(fs.root_ino, name)
                return await fs.read(attr.ino, 0, attr.size)
            finally:
                await fs.close()
        finally:
            array.close()
    return trio.run(go)
