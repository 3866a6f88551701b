"""A real etcd cluster on this machine, for benchmarks and tests: `etcd_cluster(dir, 3)`
starts three etcd members on 127.0.0.1 (their own free ports, their own data directories
and logs under `dir`), waits until they elect a leader, and stops every member it started
when the block ends, even when the block fails. `EtcdMissing` (a ReplfsError) where
Debian's etcd-server is not installed (tools/bootstrap.sh installs it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests

from replfs.errors import ReplfsError
from replfs.replication.config import free_port


class EtcdMissing(ReplfsError):
    """No etcd binary here."""


def etcd_binary() -> str | None:
    """The etcd command, or None where it is not installed."""
    path = shutil.which("etcd") or "/usr/bin/etcd"
    return path if os.access(path, os.X_OK) else None


class Etcd:
    def __init__(self, tmp: Path, members: int):
        self.names = [f"m{i}" for i in range(members)]
        self.client = {n: free_port() for n in self.names}
        self.peer = {n: free_port() for n in self.names}
        self.tmp = Path(tmp)
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.client[n]}" for n in self.names]

    def live_endpoint(self) -> str:
        """The client address of a member not killed."""
        return next(ep for n, ep in zip(self.names, self.endpoints) if n not in self.killed)

    def log(self, name: str) -> Path:
        return self.tmp / f"etcd-{name}.log"

    def start(self, name: str) -> None:
        binary = etcd_binary()
        if binary is None:
            raise EtcdMissing("etcd is not installed: install Debian's etcd-server "
                              "(tools/bootstrap.sh does)")
        cluster = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        self.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as logf:
            self.procs[name] = subprocess.Popen([
                binary, "--name", name, "--data-dir", str(self.tmp / f"etcd-{name}"),
                "--listen-client-urls", f"http://127.0.0.1:{self.client[name]}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client[name]}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer[name]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[name]}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"replfs-{os.getpid()}-{id(self)}",
                "--logger", "zap", "--log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)

    def healthy(self, name: str) -> bool:
        try:
            r = requests.get(f"http://127.0.0.1:{self.client[name]}/health", timeout=1)
            return r.ok and r.json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.healthy(n) for n in self.procs if n not in self.killed):
            for n, p in self.procs.items():
                if p.poll() is not None and n not in self.killed:
                    raise ReplfsError(f"etcd member {n} exited: "
                                      f"{self.log(n).read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise ReplfsError(f"etcd not healthy after {timeout:.0f} s "
                                  f"(logs {self.tmp}/etcd-*.log)")
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """kill -9 one member."""
        self.killed.add(name)
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@contextlib.contextmanager
def etcd_cluster(tmp, members: int = 3):
    """Start `members` etcd members with data under `tmp`; yield the `Etcd` once healthy;
    stop them all at the end."""
    if etcd_binary() is None:
        raise EtcdMissing("etcd is not installed: install Debian's etcd-server "
                          "(tools/bootstrap.sh does)")
    e = Etcd(tmp, members)
    try:
        for n in e.names:
            e.start(n)
        e.wait_healthy()
        yield e
    finally:
        e.stop()
