"""A cluster directory: `cluster.json` (who listens where), `secret` (mode 0600), one
folder per replica with its array, `faults.json` (the network faults in force, see
`read_faults`), `views.json` (the view table, unless it is kept in etcd: `etcd`),
`run/` (pid files) and `logs/`.

Every node is reached at its own port; an address (`addr`) carries the name of the node
it reaches, so that the dialler's connection layer can inject the network faults between
the two (wire.NetFaults). The FUSE clients are one node, "client"; the command-line tools
are no node (no fault touches them).
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
LEGACY_FIELDS = ("routes", "proxy")     # of the fault proxy, gone: ignored when loading
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


DURABILITY = {
    "written": "an update is answered once it is written (in the image files) on the "
               "primary and its backup: it survives kill -9 of any or all processes and "
               "the power loss of one machine; fsync, and a flush-behind within 1 s, "
               "force it",
    "forced": "an update is answered once it is forced (fsynced) on the primary and its "
              "backup: it survives the power loss of both machines too",
}


def check_durability(durability: str) -> str:
    if durability not in DURABILITY:
        raise ReplfsError(f"unknown durability {durability!r}: use "
                          f"{' or '.join(DURABILITY)}")
    return durability


def check_placement(placement: str, groups: int) -> str:
    """"spread", "parent" or a group number (as a string); a clear error otherwise."""
    placement = str(placement)
    if placement in PLACEMENTS:
        return placement
    if placement.isdigit() and int(placement) < groups:
        return str(int(placement))
    raise ReplfsError(f"placement {placement!r}: use spread, parent or a group number "
                      f"below {groups}")


def parse_faults(generation, partitions, loss) -> tuple[set, dict]:
    """Network faults as faults.json (and wire.SetFaults) hold them -- `partitions`
    [[A, B], ...], `loss` {"A>B": {"request": p, "reply": q}} -- as ({frozenset({A, B})},
    {(src, dst): drop probability}). ValueError if malformed."""
    if not isinstance(generation, int):
        raise ValueError("the generation is not an integer")
    if not (isinstance(partitions, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p)
            for p in partitions)):
        raise ValueError("partitions must be a list of [A, B] node pairs")
    if not isinstance(loss, dict):
        raise ValueError("loss must map 'A>B' to {request, reply}")
    lossmap: dict[tuple[str, str], float] = {}
    for key, spec in loss.items():
        a, sep, b = key.partition(">") if isinstance(key, str) else ("", "", "")
        if not (sep and a and b and isinstance(spec, dict)):
            raise ValueError(f"loss entry {key!r}: want 'A>B': {{request: p, reply: q}}")
        for direction, side in (((a, b), "request"), ((b, a), "reply")):
            p = spec.get(side, 0.0)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"loss {key} {side}: {p!r} is not a probability")
            lossmap[direction] = float(p)
    return {frozenset(p) for p in partitions}, lossmap


class Addr(tuple):
    """(host, port) of a node, with the node's name in `node`."""

    def __new__(cls, host: str, port: int, node: str = ""):
        self = super().__new__(cls, (host, port))
        self.node = node
        return self


SECRET_BYTES = 32


def write_secret(dirpath: str) -> str:
    """Write a new random cluster secret in `dirpath` (mode 0600, atomically); its path."""
    path = os.path.join(dirpath, SECRET)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(SECRET_BYTES) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def check_endpoint(ep: str) -> str:
    """An etcd endpoint, host:port (a clear error otherwise)."""
    host, sep, port = ep.strip().rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ReplfsError(f"etcd endpoint {ep!r}: want HOST:PORT (its client URL, "
                          f"e.g. 127.0.0.1:2379)")
    return f"{host}:{int(port)}"


def viewserver_names(count: int, etcd: list[str]) -> list[str]:
    """vs, vs1, vs2, ...: several view server processes need etcd (views.json is one
    process's)."""
    if count < 1:
        raise ReplfsError(f"a cluster needs at least one view server (asked for {count})")
    if count > 1 and not etcd:
        raise ReplfsError(f"{count} view servers need etcd to share their views: give "
                          f"--etcd HOST:PORT[,HOST:PORT...]")
    for ep in etcd:
        check_endpoint(ep)
    return [VIEWSERVER] + [f"{VIEWSERVER}{i}" for i in range(1, count)]


# Each disk image of a new cluster: sparse (ftruncate), so it costs only what is written;
# 4 of them make a 6 GiB array per server, ~6 GiB of filesystem per group.
DEFAULT_DISK_SIZE = 2 * 2**30


@dataclass
class ClusterConfig:
    dir: str
    groups: dict[int, list[str]]
    ports: dict[str, int]                       # node -> its own listening port
    ping_interval: float = 0.1
    dead_pings: int = 5
    disks: int = 4
    disk_size: int = DEFAULT_DISK_SIZE
    placement: str = "spread"      # where mkdir puts a new directory: see place_dir
    durability: str = "written"    # when an update is answered: see check_durability
    # the view server processes (one active, the others standing by: they need etcd)
    viewservers: list[str] = field(default_factory=lambda: [VIEWSERVER])
    etcd: list[str] = field(default_factory=list)    # etcd endpoints host:port; none: views.json
    etcd_prefix: str = ""          # this cluster's keys in etcd

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, dirpath: str, *, groups: int = 2, replicas: int = 2, disks: int = 4,
               disk_size: int = DEFAULT_DISK_SIZE,
               ping_interval: float = 0.1, dead_pings: int = 5,
               placement: str = "spread", durability: str = "written",
               viewservers: int = 1, etcd: list[str] | None = None) -> "ClusterConfig":
        """Servers s0..s{groups*replicas-1}; group g is s{g*replicas}..s{g*replicas+replicas-1}."""
        if groups < 1 or replicas < 1:
            raise ReplfsError(f"a cluster needs at least one group of one replica "
                              f"(asked for {groups} groups of {replicas})")
        placement = check_placement(placement, groups)
        durability = check_durability(durability)
        layout = {g: [f"s{g * replicas + i}" for i in range(replicas)] for g in range(groups)}
        servers = [s for ss in layout.values() for s in ss]
        etcd = [check_endpoint(e) for e in etcd or []]
        vss = viewserver_names(viewservers, etcd)
        ports = {**{v: free_port() for v in vss}, **{s: free_port() for s in servers}}
        cfg = cls(os.path.abspath(dirpath), layout, ports, ping_interval, dead_pings, disks,
                  disk_size, placement, durability, vss, etcd,
                  f"/replfs/{secrets.token_hex(8)}" if etcd else "")
        os.makedirs(dirpath, exist_ok=True)
        write_secret(dirpath)
        cfg.save()
        return cfg

    def save(self) -> None:
        d = dict(groups={str(g): s for g, s in self.groups.items()}, ports=self.ports,
                 ping_interval=self.ping_interval, dead_pings=self.dead_pings,
                 disks=self.disks, disk_size=self.disk_size, placement=self.placement,
                 durability=self.durability, viewservers=self.viewservers, etcd=self.etcd,
                 etcd_prefix=self.etcd_prefix)
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
        for legacy in LEGACY_FIELDS:
            d.pop(legacy, None)
        known = {f.name for f in fields(cls)} - {"dir"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ReplfsError(f"{path} has fields this replfs does not know ({', '.join(unknown)}); "
                              f"it was written by a newer version")
        d["groups"] = {int(g): s for g, s in d["groups"].items()}
        cfg = cls(os.path.abspath(dirpath), **d)
        cfg.placement = check_placement(str(cfg.placement), cfg.group_count)
        cfg.durability = check_durability(str(cfg.durability))
        return cfg

    # ---------------------------------------------------------------- queries
    def secret(self) -> bytes:
        """The cluster secret: DIR/secret, SECRET_BYTES bytes as hex, mode 0600.
        ReplfsError saying what to do if it is missing, open to others, or damaged."""
        path = os.path.join(self.dir, SECRET)
        fix = (f"stop the cluster (`replfs down {self.dir}`) and write a new one with "
               f"`replfs init --new-secret {self.dir}`")
        try:
            st = os.stat(path)
            if st.st_mode & 0o077:
                raise ReplfsError(f"{path} is readable by others (mode "
                                  f"{st.st_mode & 0o777:o}); run `chmod 600 {path}`")
            with open(path, "rb") as f:
                text = f.read(4 * SECRET_BYTES).strip()
        except FileNotFoundError:
            raise ReplfsError(f"the cluster secret {path} is missing; {fix}") from None
        except OSError as exc:
            raise ReplfsError(f"cannot read the cluster secret {path}: {exc.strerror}") from None
        if not text:
            raise ReplfsError(f"the cluster secret {path} is empty; {fix}")
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except ValueError:
            key = None
        if key is None or len(key) != SECRET_BYTES:
            raise ReplfsError(f"the cluster secret {path} is damaged (want {2 * SECRET_BYTES} "
                              f"hex digits); {fix}")
        return key

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

    def addr(self, src: str, dst: str) -> Addr:
        """Where node `src` dials node `dst` (on one machine, the same for every `src`:
        `direct(dst)`)."""
        return self.direct(dst)

    def direct(self, dst: str) -> Addr:
        """Node `dst`'s own address."""
        return Addr(HOST, self.ports[dst], dst)

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

    def read_faults(self) -> dict:
        """The network faults in force (`replfs fault partition | loss | heal`), which a
        process reads when it starts: {generation, partitions: [[A, B], ...], loss:
        {"A>B": {request: p, reply: q}}}; none when the file is absent. ReplfsError if it
        is damaged."""
        path = self.faults_path()
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            d = {}
        except ValueError as exc:
            raise ReplfsError(f"{path} is not valid JSON ({exc}); delete it and run "
                              f"`replfs fault heal {self.dir}`") from None
        if not isinstance(d, dict):
            raise ReplfsError(f"{path} does not hold an object; delete it and run "
                              f"`replfs fault heal {self.dir}`")
        d.setdefault("generation", 0)
        d.setdefault("partitions", [])
        d.setdefault("loss", {})
        try:
            parse_faults(d["generation"], d["partitions"], d["loss"])
        except ValueError as exc:
            raise ReplfsError(f"{path}: {exc}; delete it and run "
                              f"`replfs fault heal {self.dir}`") from None
        return d

    def write_faults(self, faults: dict) -> int:
        """Write `faults` (read_faults's shape) atomically under the next generation;
        returns it."""
        faults["generation"] = int(faults.get("generation", 0)) + 1
        tmp = self.faults_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(faults, f)
        os.replace(tmp, self.faults_path())
        return faults["generation"]
