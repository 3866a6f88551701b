"""The member superblock: one 4 KiB block at each end of every disk.

Format: a 20-byte header ``magic(8) version(u32) length(u32) crc32c(u32)`` followed by
`length` bytes of msgpack (a dict), zero padded to the block size. The crc covers the
header fields before it and the payload, so any damaged copy is detected; the reader then
uses the other copy (the one with the higher event counter when both are good).

The payload holds the array identity (uuid, disk index, disk count, chunk and block size,
disk size), the event counter, the clean/dirty state, and the member table: the state and
counters of *every* disk as this disk last knew them (like md's dev roles), so that the
freshest superblock tells which members are in sync and counters survive a dead disk.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import crc32c
import msgpack

from .layout import BLOCK_SIZE

MAGIC = b"REPLRAID"
VERSION = 1
_HDR = struct.Struct("<8sIII")


def pack(sb: dict) -> bytes:
    payload = msgpack.packb(sb, use_bin_type=True)
    if _HDR.size + len(payload) > BLOCK_SIZE:
        raise ValueError("superblock too large")
    head = struct.pack("<8sII", MAGIC, VERSION, len(payload))
    crc = crc32c.crc32c(payload, crc32c.crc32c(head))
    out = _HDR.pack(MAGIC, VERSION, len(payload), crc) + payload
    return out + bytes(BLOCK_SIZE - len(out))


def unpack(buf: bytes) -> tuple[dict | None, str]:
    """(superblock, "") or (None, why it is not usable)."""
    if len(buf) < BLOCK_SIZE:
        return None, "short read"
    magic, version, length, crc = _HDR.unpack_from(buf)
    if magic != MAGIC:
        return None, "no replfs superblock (not a replfs disk, or overwritten)"
    if version != VERSION:
        return None, f"format version {version}, this replfs reads {VERSION}"
    if length > BLOCK_SIZE - _HDR.size:
        return None, "damaged (bad length)"
    payload = bytes(buf[_HDR.size:_HDR.size + length])
    head = struct.pack("<8sII", magic, version, length)
    if crc32c.crc32c(payload, crc32c.crc32c(head)) != crc:
        return None, "damaged (checksum mismatch)"
    try:
        sb = msgpack.unpackb(payload, raw=False)
    except Exception:  # noqa: BLE001 - any decoding failure means a damaged copy
        return None, "damaged (undecodable)"
    if not isinstance(sb, dict):
        return None, "damaged (not a dict)"
    return sb, ""


@dataclass
class SuperblockRead:
    sb: dict | None  # the copy to use
    problem: str  # why none is usable ("" if sb)
    damaged: list[str]  # copies ("A", "B") that were damaged while the other was good


def read_both(fd: int) -> SuperblockRead:
    """Read copy A (block 0) and copy B (last block) and pick the good, freshest one."""
    size = os.fstat(fd).st_size
    if size == 0:  # block devices report 0; seek to the end instead
        size = os.lseek(fd, 0, os.SEEK_END)
    a, why_a = unpack(os.pread(fd, BLOCK_SIZE, 0))
    # Copy B sits at the end of the disk as created; trust copy A's size when it is good.
    nblocks = a["disk_blocks"] if a else size // BLOCK_SIZE
    b, why_b = (None, "disk too small")
    if nblocks >= 2:
        b, why_b = unpack(os.pread(fd, BLOCK_SIZE, (nblocks - 1) * BLOCK_SIZE))
    if a and b:
        if a.get("uuid") == b.get("uuid"):
            return SuperblockRead(a if a["events"] >= b["events"] else b, "", [])
        return SuperblockRead(a, "", ["B"])
    if a or b:
        damaged = ["B" if a else "A"]
        if why_a.startswith("no replfs") and why_b.startswith("no replfs"):
            damaged = []
        return SuperblockRead(a or b, "", damaged)
    if why_a == why_b:
        return SuperblockRead(None, why_a, [])
    return SuperblockRead(None, f"copy A: {why_a}; copy B: {why_b}", [])


def write_both(fd: int, sb: dict, disk_blocks: int) -> None:
    buf = pack(sb)
    os.pwrite(fd, buf, 0)
    os.pwrite(fd, buf, (disk_blocks - 1) * BLOCK_SIZE)
