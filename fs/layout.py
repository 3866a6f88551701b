"""The on-disk format of one replica group's filesystem, on the array's logical blocks.

    block 0                 superblock
    [log_start, +log_blocks)        the write-ahead log (txn/)
    [bmap_start, +bmap_blocks)      block allocation map: one BYTE per block (0 free, 1 used)
    [imap_start, +imap_blocks)      inode allocation map: one byte per inode slot
    [itable_start, +itable_blocks)  the inode table, INODES_PER_BLOCK inodes of INODE_SIZE
    [data_start, nblocks)           data, indirect and directory blocks

Allocation maps use a byte (not a bit) per object so that two concurrent transactions
that allocate neighbouring objects update disjoint byte ranges: the log records byte
ranges, and undoing one transaction must not touch the other's bits.

Inode numbers carry the replica group: ino = group << GROUP_SHIFT | slot. Slot 0 is never
used; slot 1 is the root directory (pyfuse3.ROOT_INODE == 1 for group 0); slot 2 is the
orphan directory, which names inodes that were unlinked while still open (reclaimed on
the last release, or at the next mount after a crash).
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, fields

import crc32c

from replfs.fs.errors import FormatError

BLOCK_SIZE = 4096
MAGIC = b"REPLFS\x00\x01"
VERSION = 1
GROUP_SHIFT = 48
ROOT_SLOT = 1
ORPHAN_SLOT = 2
FIRST_FREE_SLOT = 3

INODE_SIZE = 256
INODES_PER_BLOCK = BLOCK_SIZE // INODE_SIZE
PTRS_PER_BLOCK = BLOCK_SIZE // 4          # block pointers are u32
MAX_DEPTH = 3                              # 1024**3 blocks = 4 TiB per file
MAX_FILE_BLOCKS = PTRS_PER_BLOCK ** MAX_DEPTH
MAX_FILE_SIZE = MAX_FILE_BLOCKS * BLOCK_SIZE
NAME_MAX = 255
SYMLINK_MAX = 4095
XATTR_NAME_MAX = 255

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000


def make_ino(group: int, slot: int) -> int:
    return (group << GROUP_SHIFT) | slot


def ino_group(ino: int) -> int:
    return ino >> GROUP_SHIFT


def ino_slot(ino: int) -> int:
    return ino & ((1 << GROUP_SHIFT) - 1)


# ---------------------------------------------------------------- superblock

_SB = struct.Struct("<8sI16sIQ" + "Q" * 10 + "I")


@dataclass
class Superblock:
    uuid: bytes
    group: int
    nblocks: int
    log_start: int
    log_blocks: int
    bmap_start: int
    bmap_blocks: int
    imap_start: int
    imap_blocks: int
    itable_start: int
    itable_blocks: int
    data_start: int
    ninodes: int
    clean: int = 1

    def pack(self) -> bytes:
        body = _SB.pack(MAGIC, VERSION, self.uuid, self.group, self.nblocks,
                        self.log_start, self.log_blocks, self.bmap_start, self.bmap_blocks,
                        self.imap_start, self.imap_blocks, self.itable_start,
                        self.itable_blocks, self.data_start, self.ninodes, self.clean)
        crc = crc32c.crc32c(body)
        return (body + struct.pack("<I", crc)).ljust(BLOCK_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> "Superblock":
        body = data[:_SB.size]
        (crc,) = struct.unpack_from("<I", data, _SB.size)
        vals = _SB.unpack(body)
        if vals[0] != MAGIC:
            raise FormatError("no replfs filesystem on this array (bad magic in block 0); "
                              "run `replfs mkfs DIR` to make one")
        if crc32c.crc32c(body) != crc:
            raise FormatError("the filesystem superblock (block 0) fails its checksum; "
                              "run `replfs fsck DIR` (the array could not repair it)")
        if vals[1] != VERSION:
            raise FormatError(f"filesystem format version {vals[1]} is not supported "
                              f"(this replfs reads version {VERSION})")
        return cls(vals[2], *vals[3:])

    @classmethod
    def plan(cls, nblocks: int, group: int = 0, log_blocks: int | None = None,
             inodes: int | None = None) -> "Superblock":
        """Lay out a filesystem on `nblocks` blocks (at least 256)."""
        if nblocks < 256:
            raise FormatError(f"the array has {nblocks} blocks; a filesystem needs at least 256 "
                              "(1 MiB): make a bigger array")
        if log_blocks is None:
            log_blocks = max(64, min(nblocks // 16, 16384))     # up to 64 MiB of log
        if inodes is None:
            inodes = max(INODES_PER_BLOCK * 4, nblocks // 4)     # one inode per 16 KiB
        itable_blocks = -(-inodes // INODES_PER_BLOCK)
        inodes = itable_blocks * INODES_PER_BLOCK
        bmap_blocks = -(-nblocks // BLOCK_SIZE)
        imap_blocks = -(-inodes // BLOCK_SIZE)
        log_start = 1
        bmap_start = log_start + log_blocks
        imap_start = bmap_start + bmap_blocks
        itable_start = imap_start + imap_blocks
        data_start = itable_start + itable_blocks
        if data_start + 16 > nblocks:
            raise FormatError(f"the array ({nblocks} blocks) is too small for the log and "
                              "inode table; make a bigger array")
        return cls(uuidlib.uuid4().bytes, group, nblocks, log_start, log_blocks, bmap_start,
                   bmap_blocks, imap_start, imap_blocks, itable_start, itable_blocks,
                   data_start, inodes)


# ---------------------------------------------------------------- inodes

_INODE = struct.Struct("<IIIIQQqqqQIIBIQBIQQH")
INLINE_MAX = INODE_SIZE - _INODE.size     # inline symlink target bytes


@dataclass
class Inode:
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    size: int = 0
    blocks: int = 0            # data + indirect blocks allocated
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    generation: int = 0
    root: int = 0              # block-map root (a data block if depth 0)
    depth: int = 0
    xattr_block: int = 0
    parent: int = 0            # directories: the parent directory's ino
    dir_level: int = 0         # directories: linear-hashing level
    dir_split: int = 0         # directories: linear-hashing split pointer
    dir_entries: int = 0       # directories: number of entries
    dir_pages: int = 0         # directories: overflow pages allocated so far
    inline_len: int = 0
    inline: bytes = b""

    def pack(self) -> bytes:
        vals = [getattr(self, name) for name in _INODE_FIELDS]
        return (_INODE.pack(*vals) + self.inline).ljust(INODE_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> "Inode":
        vals = _INODE.unpack_from(data)
        ino = cls(*vals)
        ino.inline = bytes(data[_INODE.size:_INODE.size + ino.inline_len])
        return ino

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & S_IFMT == S_IFREG

    @property
    def is_lnk(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK


_INODE_FIELDS = [f.name for f in fields(Inode)][:-1]     # all but `inline`, in order

assert _INODE.size + 100 <= INODE_SIZE, _INODE.size
