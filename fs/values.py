"""Plain values of the `FileSystem` interface (fs/core.py), shared by the modules that
make up its operations: `Attr` (what getattr and friends return), `Request` and
`current_request` (how a replication server wraps one client operation), and the clock
and file-type helpers the operations use.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

from replfs.fs.layout import S_IFMT, Inode


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int          # in 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int

    @classmethod
    def of(cls, ino: int, n: Inode) -> "Attr":
        return cls(ino, n.mode, n.nlink, n.uid, n.gid, n.rdev, n.size, n.blocks * 8,
                   n.atime_ns, n.mtime_ns, n.ctime_ns, n.generation)


@dataclass
class Request:
    """Set (in `current_request`) by a replication server around one client operation.

    The operation's transaction then commits with `payload(result)` as its commit
    payload (e.g. the client id, sequence number and reply, for at-most-once), and leaves
    its `CommitRecord` (txn/) in `commit`, so that the server can forward exactly that
    transaction to its backup before answering. Read-only operations commit nothing and
    leave `commit` None."""
    payload: Callable[[Any], Any]
    commit: Any = None
    # False: commit lazily (the server makes it written -- `mgr.write()` -- and held by
    # its backup before answering); True: force the commit
    durable: bool = True
    # awaited as before_commit(txn, result) inside the transaction, just before it
    # commits (the replication server records its at-most-once reply there)
    before_commit: Callable[[Any, Any], Any] | None = None


current_request: ContextVar[Request | None] = ContextVar("replfs_fs_request", default=None)


def _now() -> int:
    return time.time_ns()


def _type_of(mode: int) -> int:
    return (mode & S_IFMT) >> 12
