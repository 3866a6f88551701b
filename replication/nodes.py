"""The nodes of a cluster: each named, with a role (a view server, a replica server, a
client) and, for those that listen, the host and port they listen on -- what a person
writes in the cluster description (`cluster.json`'s "nodes", `replfs init --viewserver
... --server ...`) and what every process dials and binds.

Several view-server nodes fit (one role, many nodes); the processes of today dial the one
named `config.VIEWSERVER`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from replfs.errors import ReplfsError

HOST = "127.0.0.1"          # where the one-machine default puts every node
ROLES = ("viewserver", "server", "client")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


@dataclass
class Node:
    """One node of a cluster: its `role` (ROLES), the `host` and `port` it listens on
    (a client listens on nothing: both None), and `data`, the directory of its data on
    its own machine when not the default DIR/NAME."""
    role: str
    host: str | None = None
    port: int | None = None
    data: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dict(role=self.role, host=self.host, port=self.port,
                                      data=self.data).items() if v is not None}

    @classmethod
    def from_json(cls, name: str, d, where: str) -> "Node":
        """A node from its description entry; ReplfsError naming `where` if malformed."""
        if not isinstance(d, dict) or set(d) - {"role", "host", "port", "data"}:
            raise ReplfsError(f"{where}: node {name!r} must be an object with role, host, "
                              f"port and (optionally) data")
        node = cls(d.get("role"), d.get("host"), d.get("port"), d.get("data"))
        check_name(name, where)
        if node.role not in ROLES:
            raise ReplfsError(f"{where}: node {name!r} has role {node.role!r}; use "
                              f"{', '.join(ROLES)}")
        if node.role != "client":
            check_host(node.host, f"{where}: node {name!r}")
            if isinstance(node.port, bool) or not isinstance(node.port, int) \
                    or not 0 < node.port < 65536:
                raise ReplfsError(f"{where}: node {name!r} has port {node.port!r}; give "
                                  f"a TCP port from 1 to 65535")
        if node.data is not None and not (isinstance(node.data, str)
                                          and os.path.isabs(node.data)):
            raise ReplfsError(f"{where}: node {name!r} has data {node.data!r}; give an "
                              f"absolute directory")
        return node


def check_name(name, where: str) -> str:
    if not (isinstance(name, str) and _NAME.match(name)):
        raise ReplfsError(f"{where}: {name!r} is not a node name (letters, digits, '.', "
                          f"'_' and '-', at most 32)")
    return name


def check_host(host, where: str) -> str:
    """An IP address or a host name, as a node's `host`."""
    if isinstance(host, str) and host:
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host):
                return host
    raise ReplfsError(f"{where}: {host!r} is not a host (an IP address or a host name)")


def parse_endpoint(text: str, default_name: str, where: str) -> tuple[str, str, int]:
    """"[NAME=]HOST:PORT" (an IPv6 host in brackets: "[::1]:7000") as (name, host,
    port); ReplfsError saying what is wrong otherwise."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = default_name, text
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ReplfsError(f"{where} {text!r}: want [NAME=]HOST:PORT, e.g. "
                          f"{default_name}=10.0.0.2:7001")
    return check_name(name, f"{where} {text!r}"), check_host(host, f"{where} {text!r}"), \
        int(port)


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
