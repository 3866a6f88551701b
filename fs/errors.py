"""Domain errors of the filesystem core. The FUSE adapter maps `FsError` to
`pyfuse3.FUSEError(errno)`; nothing else may escape a handler."""

from __future__ import annotations

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

