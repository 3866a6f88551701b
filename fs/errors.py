"""Domain errors of the filesystem core. The FUSE adapter maps `FsError` to
`pyfuse3.FUSEError(errno)`; nothing else may escape a handler."""

from __future__ import annotations

import errno
import os

from replfs.errors import ReplfsError


class FsError(Exception):
    """An operation failed with a POSIX errno; nothing it did is left behind (its
    transaction was aborted)."""

    def __init__(self, err: int, what: str = ""):
        super().__init__(err, f"{os.strerror(err)}{': ' + what if what else ''}")
        self.errno = err


class FormatError(ReplfsError):
    """The device does not hold a replfs filesystem this code can use."""



class ForeignInode(FsError):
    """The operation needs inode `ino`, which lives in another replica group.

    A single group's filesystem raises it (errno EXDEV) instead of touching the inode;
    the replication layer then reads the inode from its own group (lookup, readdir) or
    runs the operation as a distributed transaction (rename, link, unlink, rmdir, mkdir)."""

    def __init__(self, ino: int):
        super().__init__(errno.EXDEV, f"inode {ino:#x} is in replica group {ino >> 48}")
        self.ino = ino


class Stale(FsError):
    """A distributed operation's plan no longer matches the state (a name or a parent
    changed since it was read): the coordinator plans again (errno EAGAIN)."""

    def __init__(self, what: str):
        super().__init__(errno.EAGAIN, what)
