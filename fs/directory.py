"""Directories: a linear-hashing table of entry pages stored in the directory's own
block map, so that lookup and create never scan the directory.

Each name has a 62-bit hash h (blake2b). With level L and split pointer s there are
2**L + s buckets; name h lives in bucket h mod 2**L, or h mod 2**(L+1) if that is below
s. Bucket b's first page is the directory's file block b; more pages chain from it
(file blocks OVF_BASE + k). When the directory holds more than SPLIT_LOAD entries per
bucket on average, bucket s is split into s and 2**L + s.

readdir offsets are stable while the directory changes: entries are returned in order of
the bit-reversed hash r = rev62(h), and bucket b holds exactly the names whose r falls in
one contiguous range, which a split only divides (the split-ordered-list trick). The
offset after an entry is r + 1. (Two names of one directory with the same 62-bit hash
could make readdir skip one of them at a batch boundary; the chance is ~n**2 / 2**63.)

Page: header <HHHI (magic, count, used bytes, next page's file block or 0), then
entries <QQBB (h, ino, type, name length) + name.
"""

from __future__ import annotations

import errno
import hashlib
import struct

from replfs.fs import blockmap
from replfs.fs.errors import FsError
from replfs.fs.layout import BLOCK_SIZE, NAME_MAX, Inode
from replfs.fs.op import Op

PAGE_MAGIC = 0xD1E7
_HDR = struct.Struct("<HHHI")
HDR_SIZE = 12
_ENT = struct.Struct("<QQBB")
OVF_BASE = 1 << 26
SPLIT_LOAD = 24
H_BITS = 62     # cookies stay well inside a signed 64-bit off_t


def name_hash(name: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> (64 - H_BITS)


_REV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))     # each byte's bits reversed


def rev(x: int, bits: int) -> int:
    """The low `bits` bits of x (x < 2**bits) in reverse order."""
    if bits == H_BITS:          # the hot case (listings): byte-wise, through a table
        return int.from_bytes(x.to_bytes(8, "little").translate(_REV8), "big") >> (64 - bits)
    return int(format(x, f"0{bits}b")[::-1], 2) if bits else 0


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes (at most {NAME_MAX})")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL, f"invalid name {name!r}")


def _bucket(node: Inode, h: int) -> int:
    b = h & ((1 << node.dir_level) - 1)
    if b < node.dir_split:
        b = h & ((1 << (node.dir_level + 1)) - 1)
    return b


def _nbuckets(node: Inode) -> int:
    return (1 << node.dir_level) + node.dir_split


def _bucket_range(node: Inode, b: int) -> tuple[int, int]:
    """The range [start, end) of bit-reversed hashes that bucket b holds."""
    lv = node.dir_level + 1 if (b < node.dir_split or b >= (1 << node.dir_level)) else node.dir_level
    prefix = rev(b, lv)
    shift = H_BITS - lv
    return prefix << shift, (prefix + 1) << shift


class Page:
    __slots__ = ("blk", "count", "used", "next", "data")

    def __init__(self, blk: int, data: bytes):
        self.blk = blk
        self.data = data
        magic, self.count, self.used, self.next = _HDR.unpack_from(data)
        if magic != PAGE_MAGIC:
            if magic == 0 and self.count == 0:
                self.used = HDR_SIZE          # a fresh zeroed page
                self.next = 0
            else:
                raise FsError(errno.EIO, f"directory page at block {blk} is damaged")

    def entries(self):
        """Yield (offset, h, ino, type, name)."""
        off = HDR_SIZE
        data = self.data
        for _ in range(self.count):
            h, ino, typ, n = _ENT.unpack_from(data, off)
            start = off + _ENT.size
            yield off, h, ino, typ, bytes(data[start:start + n])
            off = start + n


def _entry(h: int, ino: int, typ: int, name: bytes) -> bytes:
    return _ENT.pack(h, ino, typ, len(name)) + name


async def _page(op: Op, node: Inode, idx: int) -> Page:
    blk = await blockmap.lookup(op, node, idx)
    if blk == 0:
        raise FsError(errno.EIO, f"directory page {idx} is missing")
    return Page(blk, await op.read_block(blk))


async def _chain(op: Op, node: Inode, b: int) -> list[tuple[int, Page]]:
    """The pages of bucket b's chain, in order (a list: async generators cost more)."""
    out = []
    idx = b
    while True:
        page = await _page(op, node, idx)
        out.append((idx, page))
        if not page.next:
            return out
        idx = page.next


async def init(op: Op, node: Inode) -> None:
    """Give a new directory inode its first (empty) bucket."""
    node.dir_level = node.dir_split = node.dir_entries = node.dir_pages = 0
    blk, _ = await blockmap.ensure(op, node, 0)
    await op.write_block(blk, 0, _HDR.pack(PAGE_MAGIC, 0, HDR_SIZE, 0).ljust(BLOCK_SIZE, b"\0"),
                         undo=False)


async def lookup(op: Op, node: Inode, name: bytes) -> tuple[int, int] | None:
    """(ino, type) of `name`, or None. The caller holds S or X on the directory."""
    h = name_hash(name)
    for _, page in await _chain(op, node, _bucket(node, h)):
        for _, eh, ino, typ, ename in page.entries():
            if eh == h and ename == name:
                return ino, typ
    return None


async def insert(op: Op, node: Inode, name: bytes, child: int, typ: int) -> None:
    """Add an entry (the caller checked that `name` is absent and holds X on the
    directory, and writes `node` back afterwards)."""
    h = name_hash(name)
    ent = _entry(h, child, typ, name)
    await _append(op, node, _bucket(node, h), ent)
    node.dir_entries += 1
    if node.dir_entries > SPLIT_LOAD * _nbuckets(node):
        await _split(op, node)


async def _append(op: Op, node: Inode, b: int, ent: bytes) -> None:
    last = None
    for _, page in await _chain(op, node, b):
        if page.used + len(ent) <= BLOCK_SIZE:
            await op.write_block(page.blk, page.used, ent)
            await op.write_block(page.blk, 0, _HDR.pack(PAGE_MAGIC, page.count + 1,
                                                         page.used + len(ent), page.next))
            return
        last = page
    # every page of the chain is full: chain a new one
    new_idx = _new_overflow(node)
    await _write_page(op, node, new_idx, [ent], 0)
    await op.write_block(last.blk, 0, _HDR.pack(PAGE_MAGIC, last.count, last.used, new_idx))


def _new_overflow(node: Inode) -> int:
    idx = OVF_BASE + node.dir_pages
    node.dir_pages += 1
    return idx


async def _write_page(op: Op, node: Inode, idx: int, ents: list[bytes], nxt: int) -> None:
    body = b"".join(ents)
    data = (_HDR.pack(PAGE_MAGIC, len(ents), HDR_SIZE + len(body), nxt)
            .ljust(HDR_SIZE, b"\0") + body).ljust(BLOCK_SIZE, b"\0")
    blk, fresh = await blockmap.ensure(op, node, idx)
    await op.write_block(blk, 0, data, undo=not fresh)


async def _split(op: Op, node: Inode) -> None:
    s, lv = node.dir_split, node.dir_level
    new_b = (1 << lv) + s
    mask = (1 << (lv + 1)) - 1
    stay: list[bytes] = []
    move: list[bytes] = []
    pages: list[int] = []
    for idx, page in await _chain(op, node, s):
        pages.append(idx)
        for _, h, cino, typ, name in page.entries():
            (move if (h & mask) == new_b else stay).append(_entry(h, cino, typ, name))
    node.dir_split += 1
    if node.dir_split == (1 << lv):
        node.dir_level += 1
        node.dir_split = 0
    # rewrite the old chain with what stays, reusing its pages in order
    await _fill_chain(op, node, pages, stay)
    await _fill_chain(op, node, [new_b], move)


async def _fill_chain(op: Op, node: Inode, pages: list[int], ents: list[bytes]) -> None:
    groups: list[list[bytes]] = [[]]
    used = HDR_SIZE
    for e in ents:
        if used + len(e) > BLOCK_SIZE:
            groups.append([])
            used = HDR_SIZE
        groups[-1].append(e)
        used += len(e)
    while len(pages) < len(groups):
        pages.append(_new_overflow(node))
    for i, idx in enumerate(pages):
        nxt = pages[i + 1] if i + 1 < len(pages) else 0
        await _write_page(op, node, idx, groups[i] if i < len(groups) else [], nxt)


async def remove(op: Op, node: Inode, name: bytes) -> tuple[int, int]:
    """Remove `name`; returns its (ino, type). Raises ENOENT. The caller holds X on the
    directory and writes `node` back afterwards."""
    h = name_hash(name)
    for _, page in await _chain(op, node, _bucket(node, h)):
        for off, eh, ino, typ, ename in page.entries():
            if eh == h and ename == name:
                size = _ENT.size + len(ename)
                tail = bytes(page.data[off + size:page.used])
                await op.write_block(page.blk, off, tail + bytes(size))
                await op.write_block(page.blk, 0, _HDR.pack(PAGE_MAGIC, page.count - 1,
                                                             page.used - size, page.next))
                node.dir_entries -= 1
                return ino, typ
    raise FsError(errno.ENOENT, name.decode(errors="replace"))


async def replace(op: Op, node: Inode, name: bytes, child: int, typ: int) -> None:
    """Point the existing entry `name` at `child` (same name, same size)."""
    h = name_hash(name)
    for _, page in await _chain(op, node, _bucket(node, h)):
        for off, eh, ino, etyp, ename in page.entries():
            if eh == h and ename == name:
                await op.write_block(page.blk, off, _ENT.pack(h, child, typ, len(name)))
                return
    raise FsError(errno.ENOENT, name.decode(errors="replace"))


async def list_from(op: Op, node: Inode, start: int, limit: int):
    """Up to `limit` entries (name, ino, type, next_offset) with bit-reversed hash >=
    `start`, in that order."""
    out = []
    end_space = 1 << H_BITS
    r = start
    while r < end_space and len(out) < limit:
        b = _bucket(node, rev(r, H_BITS))
        lo, hi = _bucket_range(node, b)
        ents = []
        for _, page in await _chain(op, node, b):
            for _, h, ino, typ, name in page.entries():
                rh = rev(h, H_BITS)
                if rh >= r:
                    ents.append((rh, name, ino, typ))
        ents.sort()
        for rh, name, ino, typ in ents:
            if len(out) >= limit:
                return out
            out.append((name, ino, typ, rh + 1))
        r = hi
    return out


async def all_entries(op: Op, node: Inode):
    """Every (name, ino, type), for fsck."""
    out = []
    for b in range(_nbuckets(node)):
        for _, page in await _chain(op, node, b):
            for _, h, ino, typ, name in page.entries():
                out.append((name, ino, typ, h, b))
    return out
