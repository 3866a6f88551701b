"""One member disk of an array: its file, its state, its counters and its checksums."""

from __future__ import annotations

import os

from .checksums import ChecksumStore


class DiskGone(Exception):
    """Internal: a member failed an I/O; the caller falls back to the other members."""


class Disk:
    """One member: its file, its state, its counters and its checksum store (`cs`, None
    until loaded: a member that could not be read has none)."""

    def __init__(self, index: int, path: str):
        self.index = index
        self.path = path
        self.fd: int | None = None
        self.state = "missing"  # active | rebuilding | failed | missing
        self.problem = ""  # why it is not active, for status and errors
        self.rebuild_pos = 0  # rows rebuilt so far (state "rebuilding")
        self.durable_pos = 0  # rows rebuilt and fsynced: what superblocks may record
        self.read_errors = 0
        self.write_errors = 0
        self.cksum_errors = 0  # checksum mismatches repaired
        self.unrecoverable = 0  # damaged blocks that could not be rebuilt
        self.cs: ChecksumStore | None = None
        # written since its last fdatasync began (a flush syncs only such members);
        # at first: whatever opened it may have written without saying so
        self.unsynced = True

    def readable(self, e0: int, e1: int, cb: int) -> bool:
        if self.fd is None:
            return False
        if self.state == "active":
            return True
        return self.state == "rebuilding" and -(-e1 // cb) <= self.rebuild_pos

    def writable(self) -> bool:
        return self.fd is not None and self.state in ("active", "rebuilding")

    def counters(self) -> dict:
        return {"read_errors": self.read_errors, "write_errors": self.write_errors,
                "cksum_errors": self.cksum_errors, "unrecoverable": self.unrecoverable}

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def disk_size(fd: int) -> int:
    """Size in bytes of an image file or block device."""
    size = os.fstat(fd).st_size
    return size if size else os.lseek(fd, 0, os.SEEK_END)
