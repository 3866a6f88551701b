"""A cluster directory: `cluster.json` (the cluster's description: its nodes with their
roles and addresses, its replica groups and settings), `secret` (mode 0600), one folder
per replica with its array, `faults.json` (the network faults in force, see
`read_faults`), `views.json` (the view table, unless it is kept in etcd: `etcd`),
`run/` (pid files) and `logs/`.

A cluster is a set of named nodes (`Node`): view-server nodes and servers, each with the
host and port it listens on, and clients, which only dial out. On one machine (`replfs
up`) every node is on 127.0.0.1 and every replica's folder is under one directory; over
several machines each machine holds a copy of the description and the secret, and each
node keeps its data in its own directory there (`server_dir`: DIR/NAME unless the
description names another). See docs/operations.md.

Every node is reached at its own address; an address (`addr`) carries the name of the
node it reaches, so that the dialler's connection layer can inject the network faults
between the two (wire.NetFaults). The FUSE clients are one node, "client"; the
command-line tools are no node (no fault touches them).
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
from replfs.replication.nodes import HOST, Node, is_loopback

CONFIG = "cluster.json"
LEGACY_FIELDS = ("routes", "proxy")     # of the fault proxy, gone: ignored when loading
SECRET = "secret"
VIEWSERVER = "vs"
CLIENT = "client"


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
    nodes: dict[str, Node]                      # name -> role and address
    ping_interval: float = 0.1
    dead_pings: int = 5
    disks: int = 4
    disk_size: int = DEFAULT_DISK_SIZE
    placement: str = "spread"      # where mkdir puts a new directory: see place_dir
    durability: str = "written"    # when an update is answered: see check_durability
    # etcd endpoints host:port, where the view servers (the nodes of role viewserver: one
    # active, the others standing by) keep the views; none: views.json, one view server
    etcd: list[str] = field(default_factory=list)
    etcd_prefix: str = ""          # this cluster's keys in etcd

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, dirpath: str, *, groups: int = 2, replicas: int | None = None,
               disks: int = 4, disk_size: int = DEFAULT_DISK_SIZE,
               ping_interval: float = 0.1, dead_pings: int = 5,
               placement: str = "spread", durability: str = "written",
               viewserver: list[tuple[str, str, int]] | None = None,
               servers: list[tuple[str, str, int]] | None = None,
               viewservers: int = 1, etcd: list[str] | None = None) -> "ClusterConfig":
        """Without `servers`: the one-machine default, every node on 127.0.0.1 at a free
        port, servers s0..s{groups*replicas-1} (replicas default 2) and `viewservers`
        view servers vs, vs1, ... With `servers` [(name, host, port), ...] and
        `viewserver` [(name, host, port), ...]: those addresses, the servers split in
        their order into `groups` groups of equal size. Group g is the g-th run of
        `replicas` servers: s{g*replicas}..s{g*replicas+replicas-1}. More than one view
        server needs `etcd` (its endpoints, host:port), which then keeps the views."""
        etcd = [check_endpoint(e) for e in etcd or []]
        if viewserver is None:
            viewserver = [(n, HOST, 0) for n in viewserver_names(viewservers, etcd)]
        else:
            viewserver_names(len(viewserver), etcd)
        if servers is None:
            replicas = 2 if replicas is None else replicas
            servers = [(f"s{i}", HOST, 0) for i in range(groups * replicas)]
        elif groups < 1 or len(servers) % groups or (
                replicas is not None and replicas * groups != len(servers)):
            raise ReplfsError(f"{len(servers)} servers do not make {groups} groups"
                              + (f" of {replicas}" if replicas is not None else "")
                              + "; give groups x replicas servers")
        else:
            replicas = len(servers) // groups
        if groups < 1 or replicas < 1:
            raise ReplfsError(f"a cluster needs at least one group of one replica "
                              f"(asked for {groups} groups of {replicas})")
        placement = check_placement(placement, groups)
        durability = check_durability(durability)
        names = [*(n for n, _, _ in viewserver), CLIENT, *(n for n, _, _ in servers)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ReplfsError(f"node name {dup[0]} is given twice (the clients are "
                              f"{CLIENT}); name each node once")
        nodes = {**{n: Node("viewserver", h, p or free_port()) for n, h, p in viewserver},
                 **{n: Node("server", h, p or free_port()) for n, h, p in servers},
                 CLIENT: Node("client")}
        taken = [(n.host, n.port) for n in nodes.values() if n.port]
        clash = sorted({a for a in taken if taken.count(a) > 1})
        if clash:
            raise ReplfsError(f"two nodes listen on {clash[0][0]}:{clash[0][1]}; give each "
                              f"node on one host its own port")
        layout = {g: [n for n, _, _ in servers[g * replicas:(g + 1) * replicas]]
                  for g in range(groups)}
        cfg = cls(os.path.abspath(dirpath), layout, nodes, ping_interval, dead_pings, disks,
                  disk_size, placement, durability, etcd,
                  f"/replfs/{secrets.token_hex(8)}" if etcd else "")
        os.makedirs(dirpath, exist_ok=True)
        write_secret(dirpath)
        cfg.save()
        return cfg

    def save(self) -> None:
        d = dict(nodes={n: node.to_json() for n, node in self.nodes.items()},
                 groups={str(g): s for g, s in self.groups.items()},
                 ping_interval=self.ping_interval, dead_pings=self.dead_pings,
                 disks=self.disks, disk_size=self.disk_size, placement=self.placement,
                 durability=self.durability, etcd=self.etcd, etcd_prefix=self.etcd_prefix)
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
        if not isinstance(d, dict):
            raise ReplfsError(f"{path} does not hold an object; re-create the cluster "
                              f"with `replfs init`")
        for legacy in LEGACY_FIELDS:
            d.pop(legacy, None)
        if "ports" in d and "nodes" not in d:      # before nodes had addresses: all local
            ports = d.pop("ports")
            d["nodes"] = {n: dict(role="viewserver" if n == VIEWSERVER else "server",
                                  host=HOST, port=p) for n, p in ports.items()}
            d["nodes"][CLIENT] = dict(role="client")
        known = {f.name for f in fields(cls)} - {"dir"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ReplfsError(f"{path} has fields this replfs does not know ({', '.join(unknown)}); "
                              f"it was written by a newer version")
        if not isinstance(d.get("nodes"), dict) or not isinstance(d.get("groups"), dict):
            raise ReplfsError(f"{path} needs \"nodes\" and \"groups\" objects; re-create "
                              f"the cluster with `replfs init`")
        d["nodes"] = {n: Node.from_json(n, v, path) for n, v in d["nodes"].items()}
        try:
            d["groups"] = {int(g): list(s) for g, s in d["groups"].items()}
        except (TypeError, ValueError):
            raise ReplfsError(f"{path}: groups must map a group number to a list of "
                              f"servers") from None
        cfg = cls(os.path.abspath(dirpath), **d)
        cfg._check_nodes(path)
        cfg.placement = check_placement(str(cfg.placement), cfg.group_count)
        cfg.durability = check_durability(str(cfg.durability))
        return cfg

    def _check_nodes(self, where: str) -> None:
        """Every server of a group a server node, each in one group; at least one
        view-server node, and more than one only with etcd (they share the views)."""
        vss = self.viewservers
        if not vss:
            raise ReplfsError(f"{where}: no view-server node; add \"{VIEWSERVER}\": "
                              f"{{\"role\": \"viewserver\", \"host\": ..., \"port\": ...}} "
                              f"to nodes")
        if len(vss) > 1 and not self.etcd:
            raise ReplfsError(f"{where}: {len(vss)} view-server nodes need etcd to share "
                              f"their views; add \"etcd\": [\"HOST:PORT\", ...] or keep one")
        for ep in self.etcd:
            check_endpoint(ep)
        seen: set[str] = set()
        for g, members in self.groups.items():
            for s in members:
                node = self.nodes.get(s)
                if node is None or node.role != "server":
                    raise ReplfsError(f"{where}: group {g} names {s!r}, which is not a "
                                      f"server node; add it to nodes with role server")
                if s in seen:
                    raise ReplfsError(f"{where}: server {s} is in two groups; put it in one")
                seen.add(s)
        if not self.groups or sorted(self.groups) != list(range(len(self.groups))) \
                or not all(self.groups.values()):
            raise ReplfsError(f"{where}: groups must be numbered 0, 1, ... and each hold "
                              f"at least one server")

    # ---------------------------------------------------------------- queries
    @property
    def ports(self) -> dict[str, int]:
        """Node -> the port it listens on (clients listen on none)."""
        return {n: node.port for n, node in self.nodes.items() if node.port is not None}

    def role_nodes(self, role: str) -> list[str]:
        """The names of the nodes of `role`, in the description's order."""
        return [n for n, node in self.nodes.items() if node.role == role]

    @property
    def viewservers(self) -> list[str]:
        return self.role_nodes("viewserver")

    @property
    def one_machine(self) -> bool:
        """Every listening node on a loopback address (`replfs up` can run it all)."""
        return all(is_loopback(n.host) for n in self.nodes.values() if n.port is not None)

    def where(self, node: str) -> str:
        """HOST:PORT of a listening node, for messages."""
        n = self.nodes[node]
        return f"[{n.host}]:{n.port}" if ":" in (n.host or "") else f"{n.host}:{n.port}"

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
        node = self.nodes[dst]
        return Addr(node.host, node.port, dst)

    def server_dir(self, server: str) -> str:
        """Where server `server` keeps its array on its own machine: the description's
        `data` for it, else DIR/NAME."""
        node = self.nodes.get(server)
        return node.data if node is not None and node.data else os.path.join(self.dir, server)

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
