"""A real etcd cluster on this machine, for benchmarks and tests: `etcd_cluster(dir, 3)`
starts three etcd members on 127.0.0.1 (their own free ports, their own data directories
and logs under `dir`), waits until they elect a leader, and stops every member it started
when the block ends, even when the block fails. `EtcdMissing` (a ReplfsError) where
Debian's etcd-server is not installed (tools/bootstrap.sh installs it).

Members may instead run as on machines of their own (tests/netnshelp.py): `hosts` gives
each its address and `wrap` the command that runs a program on its machine (e.g. `ip
netns exec NS`); each then listens on its address at etcd's usual ports, 2379 for clients
and 2380 for peers, and its health is asked for from its own machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
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


# Asked on a member's own machine: its /health answer, printed.
HEALTH = ("import sys, urllib.request\n"
          "print(urllib.request.urlopen(sys.argv[1], timeout=1).read().decode())")


class Etcd:
    def __init__(self, tmp: Path, members: int, hosts: dict[str, str] | None = None,
                 wrap: dict[str, list[str]] | None = None,
                 election_timeout: int | None = None):
        # etcd's --election-timeout in ms (None: etcd's default, 1000). It sets the
        # shortest lease etcd grants (1.5 election timeouts, rounded up to a second), so
        # how soon a standby view server can take over: 2 s by default, 1 s at 500
        self.election_timeout = election_timeout
        self.names = [f"m{i}" for i in range(members)]
        self.host = hosts or {n: "127.0.0.1" for n in self.names}
        self.wrap = wrap or {n: [] for n in self.names}
        self.client = {n: 2379 if hosts else free_port() for n in self.names}
        self.peer = {n: 2380 if hosts else free_port() for n in self.names}
        self.tmp = Path(tmp)
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    def url(self, name: str, port: int) -> str:
        return f"http://{self.host[name]}:{port}"

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.host[n]}:{self.client[n]}" for n in self.names]

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
        cluster = ",".join(f"{n}={self.url(n, self.peer[n])}" for n in self.names)
        client, peer = self.url(name, self.client[name]), self.url(name, self.peer[name])
        self.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as logf:
            self.procs[name] = subprocess.Popen([
                *self.wrap[name], binary, "--name", name,
                "--data-dir", str(self.tmp / f"etcd-{name}"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"replfs-{os.getpid()}-{id(self)}",
                "--logger", "zap", "--log-level", "warn",
                *(["--election-timeout", str(self.election_timeout)]
                  if self.election_timeout else [])],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)

    def healthy(self, name: str) -> bool:
        url = f"{self.url(name, self.client[name])}/health"
        try:
            if self.wrap[name]:
                r = subprocess.run([*self.wrap[name], sys.executable, "-c", HEALTH, url],
                                   capture_output=True, text=True, timeout=30)
                return json.loads(r.stdout or "{}").get("health") == "true"
            r = requests.get(url, timeout=1)
            return r.ok and r.json().get("health") == "true"
        except (requests.RequestException, ValueError, subprocess.TimeoutExpired):
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
        """kill -9 every member: their data is thrown away, and a member stopped politely
        first hands its leadership on, which with a peer dead took 7 s."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait(10)


@contextlib.contextmanager
def etcd_cluster(tmp, members: int = 3, hosts: dict[str, str] | None = None,
                 wrap: dict[str, list[str]] | None = None,
                 election_timeout: int | None = None):
    """Start `members` etcd members with data under `tmp` (each at its address in `hosts`,
    run through its command in `wrap`, with `election_timeout`: see above); yield the
    `Etcd` once healthy; stop them all at the end."""
    if etcd_binary() is None:
        raise EtcdMissing("etcd is not installed: install Debian's etcd-server "
                          "(tools/bootstrap.sh does)")
    e = Etcd(tmp, members, hosts, wrap, election_timeout)
    try:
        for n in e.names:
            e.start(n)
        e.wait_healthy()
        yield e
    finally:
        e.stop()
