"""Separate machines for tests, as Linux network namespaces: one namespace per node (the
view servers, the etcd members, each server, the client), each with its own address in
SUBNET on an `eth0` joined to the others through a bridge in a hub namespace of its own
-- so no address or interface is added outside these namespaces. Each node runs as a person would run it on
its machine: its own copy of the cluster description and the secret in its own
directory, started with `ip netns exec NS replfs ...`.

The client's mount runs with `nsenter --net` (the client's network namespace, the
test's mount namespace): `ip netns exec` would give it a mount namespace of its own,
where neither the writer nor the test would see the mount.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mounthelp import force_unmount, is_mounted
from replfs.replication.config import VIEWSERVER
from replfs.tools import etcdlocal
from replfs.tools.cluster import REPLFS

SUBNET = "10.213.0"
PORT = 7000


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Network:
    """The namespaces of `nodes`, node i at SUBNET.(i+2); `remove()` deletes them all (and
    with them every interface and the bridge)."""

    def __init__(self, nodes: list[str]):
        tag = f"rfs{os.getpid()}"
        self.hub = f"{tag}-hub"
        self.ns = {n: f"{tag}-{n}" for n in nodes}
        self.addr = {n: f"{SUBNET}.{i + 2}" for i, n in enumerate(nodes)}
        self.made: list[str] = []

    def make(self) -> "Network":
        remove_stale()
        ip("netns", "add", self.hub)
        self.made.append(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (node, ns) in enumerate(self.ns.items()):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            ip("-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def link(self, node: str, up: bool) -> None:
        """Plug `node`'s machine into the network, or pull its cable (`eth0` down)."""
        ip("-n", self.ns[node], "link", "set", "eth0", "up" if up else "down")

    def remove(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()


def remove_stale() -> None:
    """Delete the namespaces a test run killed outright left behind (its pid in their
    names, that process gone); never those of a run still going."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    for name in listed:
        m = re.fullmatch(r"rfs(\d+)-[\w-]+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class NetCluster:
    """One group of two servers (s0, s1), `viewservers` view servers (vs, vs1, ...) and a
    client, each node in its own namespace with its own directory under `base`; with
    `etcd` members (m0, m1, ...; tools/etcdlocal.py's, each in its own namespace too)
    the views are kept in etcd. `stop()` stops every process it started, unmounts, and
    removes the namespaces, whatever state it is in."""

    SERVERS = ("s0", "s1")

    def __init__(self, base: Path, viewservers: int = 1, etcd: int = 0):
        self.base = base
        self.vss = [VIEWSERVER + (str(i) if i else "") for i in range(viewservers)]
        members = [f"m{i}" for i in range(etcd)]
        self.net = Network([*self.vss, *members, *self.SERVERS, "client"])
        self.etcd = etcdlocal.Etcd(
            base / "etcd", etcd, hosts={m: self.net.addr[m] for m in members},
            wrap={m: ["ip", "netns", "exec", self.net.ns[m]] for m in members}
        ) if etcd else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.mnt = base / "mnt"

    def dir(self, node: str) -> Path:
        return self.base / node

    def make(self) -> "NetCluster":
        """Namespaces, then `replfs init` of the description with every node's address
        (as on the first machine), copied with the secret into each node's directory;
        each server makes its array on its own 'machine' (`init --here`)."""
        self.net.make()
        etcd = []
        if self.etcd:
            for m in self.etcd.names:
                self.etcd.start(m)
            self.etcd.wait_healthy()
            etcd = ["--etcd", ",".join(self.etcd.endpoints)]
        origin = self.base / "origin"
        run([*REPLFS, "init", str(origin), "--groups", "1", "--size", "16M", *etcd,
             *(a for v in self.vss for a in ("--viewserver", f"{v}={self.net.addr[v]}:{PORT}")),
             *(a for s in self.SERVERS for a in ("--server", f"{s}={self.net.addr[s]}:{PORT}"))])
        for node in [*self.vss, *self.SERVERS, "client"]:
            self.dir(node).mkdir()
            for f in ("cluster.json", "secret"):
                shutil.copy2(origin / f, self.dir(node) / f)
        for s in self.SERVERS:
            run(["ip", "netns", "exec", self.net.ns[s], *REPLFS, "init", str(self.dir(s)),
                 "--here", s])
        return self

    def start(self, node: str) -> subprocess.Popen:
        """Start `node`'s process on its machine (a server, a view server, or the
        client's mount on `mnt`)."""
        d = str(self.dir(node))
        if node == "client":
            self.mnt.mkdir(exist_ok=True)
            argv = ["nsenter", f"--net=/run/netns/{self.net.ns[node]}", *REPLFS, "mount", d,
                    str(self.mnt)]
        else:
            sub = (["viewserver", d, "--name", node] if node in self.vss
                   else ["server", d, node])
            argv = ["ip", "netns", "exec", self.net.ns[node], *REPLFS, *sub]
        (self.dir(node) / "logs").mkdir(exist_ok=True)
        with open(self.dir(node) / "logs" / f"{node}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        self.procs[node] = proc
        if node == "client":
            deadline = time.monotonic() + 30
            while not is_mounted(self.mnt):
                assert proc.poll() is None, f"the mount exited: {self.log('client')}"
                assert time.monotonic() < deadline, f"{self.mnt} not mounted after 30 s"
                time.sleep(0.05)
        return proc

    def kill(self, *nodes: str) -> None:
        """kill -9 every one of `nodes` at once (an etcd member on its own), then reap
        them."""
        if self.etcd and nodes[0] in self.etcd.names:
            (member,) = nodes
            self.etcd.kill(member)
            return
        for n in nodes:
            os.kill(self.procs[n].pid, signal.SIGKILL)
        for n in nodes:
            self.procs[n].wait(10)

    def replfs(self, node: str, *args: str) -> str:
        """`replfs ARGS` on `node`'s machine, "DIR" in ARGS standing for its directory;
        its output."""
        return run(["ip", "netns", "exec", self.net.ns[node], *REPLFS,
                    *(str(self.dir(node)) if a == "DIR" else a for a in args)])

    def status(self) -> dict:
        """`replfs status DIR --json`, run on the client's machine."""
        r = subprocess.run(["ip", "netns", "exec", self.net.ns["client"], *REPLFS, "status",
                            str(self.dir("client")), "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout, f"status printed nothing: {r.stderr}"
        return json.loads(r.stdout)

    def wait_status(self, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if pred(st):
                return st
            assert time.monotonic() < deadline, (
                f"{what} not within {timeout} s: {st['state']} {st['problems']}; "
                f"views {st['viewserver'].get('groups')}")
            time.sleep(0.2)

    def log(self, node: str) -> str:
        p = self.dir(node) / "logs" / f"{node}.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def stop(self) -> None:
        try:
            if is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                               timeout=30)
            for proc in self.procs.values():
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(10)
            force_unmount(self.mnt)
        finally:
            try:
                if self.etcd:
                    self.etcd.stop()
            finally:
                self.net.remove()


def run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)} failed: {r.stdout}{r.stderr}"
    return r.stdout


# The writer: appends fixed-size numbered records to a file through the mount, each
# followed by fsync, and prints "ok N" once both returned or "fail N ERRNO" when either
# failed, until the stop file exists.
RECORD = 64
WRITER = r"""
import os, sys
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while not os.path.exists(stop):
    rec = (f"{i:08d} " + "r" * 64)[:63] + "\n"
    try:
        os.write(fd, rec.encode())
        os.fsync(fd)
        print("ok", i, flush=True)
    except OSError as exc:
        print("fail", i, exc.errno, flush=True)
    i += 1
os.close(fd)
"""


class Writer:
    """The writer above, appending to `path` (a file in a mount), as a subprocess."""

    def __init__(self, path: Path, out: Path):
        self.path, self.out, self.stopfile = path, out, out.with_suffix(".stop")
        self.outf = open(out, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path),
                                      str(self.stopfile)], stdout=self.outf,
                                     stderr=subprocess.STDOUT)

    def results(self) -> tuple[list[int], list[int]]:
        """(acknowledged record numbers, failed ones), so far."""
        ok, failed = [], []
        text = self.out.read_text()
        for line in text[:text.rfind("\n") + 1].splitlines():  # a line half written: not yet
            parts = line.split()
            if parts and parts[0] == "ok":
                ok.append(int(parts[1]))
            elif parts and parts[0] == "fail":
                failed.append(int(parts[1]))
        return ok, failed

    def wait_acks(self, more: int, timeout: float) -> None:
        """Until `more` records beyond those acknowledged now are acknowledged."""
        want = len(self.results()[0]) + more
        deadline = time.monotonic() + timeout
        while len(self.results()[0]) < want:
            assert self.proc.poll() is None, f"the writer exited: {self.out.read_text()[-500:]}"
            assert time.monotonic() < deadline, (
                f"{more} more appends not acknowledged within {timeout} s")
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> None:
        self.stopfile.touch()
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.outf.close()

    def check(self, content: bytes) -> list[int]:
        """Every acknowledged record in `content` exactly once, in order; nothing but
        whole records, each one the writer wrote (a failed one whole or absent).
        Returns the record numbers found."""
        ok, failed = self.results()
        assert len(content) % RECORD == 0, f"a record is half there ({len(content)} bytes)"
        found = []
        for k in range(0, len(content), RECORD):
            rec = content[k:k + RECORD]
            n = int(rec[:8])
            assert rec == ((f"{n:08d} " + "r" * 64)[:63] + "\n").encode(), f"bad record {rec!r}"
            found.append(n)
        assert len(found) == len(set(found)), "a record is there twice"
        assert set(ok) <= set(found), f"acknowledged appends lost: {sorted(set(ok) - set(found))}"
        assert set(found) <= set(ok) | set(failed), "a record the writer never finished"
        assert found == sorted(found), "records out of order"
        return found
