"""A real etcd cluster for tests: `etcd_cluster(tmp, 3)` starts three etcd members on
127.0.0.1 (their own ports, their own data directories under `tmp`), waits until they
elect a leader, and stops every member it started when the block ends, even when a test
fails. Skips the test where Debian's etcd-server is not installed (tools/bootstrap.sh
installs it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from replfs.replication.config import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class Etcd:
    def __init__(self, tmp: Path, members: int):
        self.names = [f"m{i}" for i in range(members)]
        self.client = {n: free_port() for n in self.names}
        self.peer = {n: free_port() for n in self.names}
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.client[n]}" for n in self.names]

    def live_endpoint(self) -> str:
        """The client address of a member not killed."""
        return next(ep for n, ep in zip(self.names, self.endpoints) if n not in self.killed)

    def start(self, name: str) -> None:
        cluster = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        logf = open(self.tmp / f"etcd-{name}.log", "ab")
        with logf:
            self.procs[name] = subprocess.Popen([
                ETCD, "--name", name, "--data-dir", str(self.tmp / f"etcd-{name}"),
                "--listen-client-urls", f"http://127.0.0.1:{self.client[name]}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client[name]}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer[name]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[name]}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"replfs-test-{os.getpid()}",
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
                assert p.poll() is None or n in self.killed, \
                    f"etcd {n} exited: {(self.tmp / f'etcd-{n}.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"etcd not healthy after {timeout} s"
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
def etcd_cluster(tmp: Path, members: int = 3):
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd is not installed (Debian's etcd-server; tools/bootstrap.sh "
                    "installs it)")
    e = Etcd(tmp, members)
    try:
        for n in e.names:
            e.start(n)
        e.wait_healthy()
        yield e
    finally:
        e.stop()
