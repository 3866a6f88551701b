"""A cluster directory: `cluster.json` (who listens where), `secret` (mode 0600), one
folder per replica with its array, `run/` (pid files) and `logs/`.

Every connection between two named nodes goes through a *route*: with the fault proxy on
(the default), node A reaches node B at its own proxy port for the pair (A, B), so that
`replfs fault partition A B` can cut exactly that pair, and loss can be injected per
direction. Without the proxy a route is B's own port. The FUSE clients are one node,
"client"; the command-line tools dial servers directly (never through the proxy).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from dataclasses import dataclass, field, fields

from replfs.errors import ReplfsError
from replfs.fs.layout import ino_group

CONFIG = "cluster.json"
SECRET = "secret"
VIEWSERVER = "vs"
CLIENT = "client"
HOST = "127.0.0.1"


_taken: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port that is free now and outside the kernel's ephemeral range, so that no
    outgoing connection can be holding it when the cluster starts later."""
    import random
    lo, hi = _ephemeral_range()
    candidates = [(10000, lo - 1)] if lo > 11000 else [(hi + 1, 65535)]
    for _ in range(1000):
        port = random.randint(*candidates[0])
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise ReplfsError("no free TCP port found on 127.0.0.1")


PLACEMENTS = ("spread", "parent")


def place_by_name(name: bytes, groups: int) -> int:
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") % groups


def check_placement(placement: str, groups: int) -> str:
    """"spread", "parent" or a group number (as a string); a clear error otherwise."""
    placement = str(placement)
    if placement in PLACEMENTS:
        return placement
    if placement.isdigit() and int(placement) < groups:
        return str(int(placement))
    raise ReplfsError(f"placement {placement!r}: use spread, parent or a group number "
                      f"below {groups}")


@dataclass
class ClusterConfig:
    dir: str
    groups: dict[int, list[str]]
    ports: dict[str, int]                       # node -> its own listening port
    routes: dict[str, int] = field(default_factory=dict)   # "A>B" -> proxy port
    ping_interval: float = 0.1
    dead_pings: int = 5
    disks: int = 4
    disk_size: int = 128 * 2**20
    proxy: bool = True
    placement: str = "spread"      # where mkdir puts a new directory: see place_dir

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, dirpath: str, *, groups: int = 2, replicas: int = 2, disks: int = 4,
               disk_size: int = 128 * 2**20, proxy: bool = True,
               ping_interval: float = 0.1, dead_pings: int = 5,
               placement: str = "spread") -> "ClusterConfig":
        """Servers s0..s{groups*replicas-1}; group g is s{g*replicas}..s{g*replicas+replicas-1}."""
        if groups < 1 or replicas < 1:
            raise ReplfsError(f"a cluster needs at least one group of one replica "
                              f"(asked for {groups} groups of {replicas})")
        placement = check_placement(placement, groups)
        layout = {g: [f"s{g * replicas + i}" for i in range(replicas)] for g in range(groups)}
        servers = [s for ss in layout.values() for s in ss]
        ports = {VIEWSERVER: free_port(), **{s: free_port() for s in servers}}
        routes = {}
        if proxy:
            for s in servers:
                routes[f"{s}>{VIEWSERVER}"] = free_port()
                routes[f"{CLIENT}>{s}"] = free_port()
                for t in servers:
                    if t != s:
                        routes[f"{s}>{t}"] = free_port()
            routes[f"{CLIENT}>{VIEWSERVER}"] = free_port()
        cfg = cls(os.path.abspath(dirpath), layout, ports, routes, ping_interval,
                  dead_pings, disks, disk_size, proxy, placement)
        os.makedirs(dirpath, exist_ok=True)
        secret_path = os.path.join(dirpath, SECRET)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.chmod(secret_path, 0o600)
        cfg.save()
        return cfg

    def save(self) -> None:
        d = dict(groups={str(g): s for g, s in self.groups.items()}, ports=self.ports,
                 routes=self.routes, ping_interval=self.ping_interval,
                 dead_pings=self.dead_pings, disks=self.disks, disk_size=self.disk_size,
                 proxy=self.proxy, placement=self.placement)
        tmp = os.path.join(self.dir, CONFIG + ".tmp")
        with open(tmp, "w") as f:
            json.dump(d, f, indent=2)
        os.replace(tmp, os.path.join(self.dir, CONFIG))

    @classmethod
    def load(cls, dirpath: str) -> "ClusterConfig":
        path = os.path.join(dirpath, CONFIG)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ReplfsError(f"{dirpath} holds no replfs cluster (no {CONFIG}); "
                              f"make one with `replfs init {dirpath}`") from None
        except ValueError as exc:
            raise ReplfsError(f"{path} is not valid JSON ({exc}); re-create the cluster "
                              f"with `replfs init`") from None
        known = {f.name for f in fields(cls)} - {"dir"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ReplfsError(f"{path} has fields this replfs does not know ({', '.join(unknown)}); "
                              f"it was written by a newer version")
        d["groups"] = {int(g): s for g, s in d["groups"].items()}
        cfg = cls(os.path.abspath(dirpath), **d)
        cfg.placement = check_placement(str(cfg.placement), cfg.group_count)
        return cfg

    # ---------------------------------------------------------------- queries
    def secret(self) -> bytes:
        path = os.path.join(self.dir, SECRET)
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise ReplfsError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); "
                              f"run `chmod 600 {path}`")
        with open(path) as f:
            return bytes.fromhex(f.read().strip())

    @property
    def servers(self) -> list[str]:
        return [s for ss in self.groups.values() for s in ss]

    @property
    def group_count(self) -> int:
        return len(self.groups)

    def group_servers(self, group: int) -> list[str]:
        try:
            return self.groups[group]
        except KeyError:
            raise ReplfsError(f"no replica group {group} in this cluster "
                              f"(groups 0..{self.group_count - 1})") from None

    def place_dir(self, parent_ino: int, name: bytes) -> int:
        """The group that holds a new directory `name` made in directory `parent_ino`:
        "parent": the parent's group; a group number: that group; "spread": a hash of
        the name (so top-level directories spread over the groups)."""
        if self.placement == "parent":
            return ino_group(parent_ino)
        if self.placement == "spread":
            return place_by_name(name, self.group_count)
        return int(self.placement)

    def group_of(self, server: str) -> int:
        for g, ss in self.groups.items():
            if server in ss:
                return g
        raise ReplfsError(f"no server {server!r} in this cluster (servers: {', '.join(self.servers)})")

    def addr(self, src: str, dst: str) -> tuple[str, int]:
        """Where node `src` dials node `dst`."""
        port = self.routes.get(f"{src}>{dst}") if self.proxy else None
        return HOST, port or self.ports[dst]

    def direct(self, dst: str) -> tuple[str, int]:
        return HOST, self.ports[dst]

    def server_dir(self, server: str) -> str:
        return os.path.join(self.dir, server)

    def run_dir(self) -> str:
        d = os.path.join(self.dir, "run")
        os.makedirs(d, exist_ok=True)
        return d

    def log_dir(self) -> str:
        d = os.path.join(self.dir, "logs")
        os.makedirs(d, exist_ok=True)
        return d

    def pid_path(self, name: str) -> str:
        return os.path.join(self.run_dir(), f"{name}.pid")

    def read_pid(self, name: str) -> int | None:
        try:
            with open(self.pid_path(name)) as f:
                return int(f.read().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def faults_path(self) -> str:
        return os.path.join(self.dir, "faults.json")
