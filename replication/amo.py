"""At-most-once: the last reply per client lane, kept in the replicated block space.

The table lives in a reserved tail of the array's logical blocks, outside the filesystem
(`replfs init` makes the filesystem `TAIL_BLOCKS` blocks shorter than the array):

    [n - TAIL_BLOCKS, +TABLE_BLOCKS)   the table: SLOTS_PER_BLOCK slots of SLOT bytes per block
    [.., +DECISION_BLOCKS)             the 2PC coordinator's decisions (replication/decisions.py)
    n - 1                              this replica's replication position (never replicated)

A slot holds ``[client, lane, seq, reply]`` (msgpack, 2-byte length first). The primary
writes a request's slot *inside the operation's own transaction* (fs `Request.before_commit`),
so the reply is durable exactly when the operation is, travels to the backup with the
operation's other changes, survives restarts, and is part of every state transfer.
A lane has one request outstanding at a time, so its last reply is all we need.
"""

from __future__ import annotations

import msgpack

from replfs.fs.layout import BLOCK_SIZE
from replfs.replication import wire

TABLE_BLOCKS = 64
DECISION_BLOCKS = 16
TAIL_BLOCKS = TABLE_BLOCKS + DECISION_BLOCKS + 1
SLOT = 512
SLOTS_PER_BLOCK = BLOCK_SIZE // SLOT


async def load_slots(mgr, first: int, nblocks: int, slot_size: int, name: str) -> list:
    """Every used slot of a slotted table in blocks [first, first + nblocks): slots of
    `slot_size` bytes, each a 2-byte length and a msgpack body (length 0: free).
    Returns [(slot number, unpacked body)], skipping bodies that do not unpack."""
    async def fn(txn):
        return [await txn.read(first + i) for i in range(nblocks)]
    per_block = BLOCK_SIZE // slot_size
    out = []
    for i, data in enumerate(await mgr.run(fn, name=name)):
        for j in range(per_block):
            raw = data[j * slot_size:(j + 1) * slot_size]
            n = int.from_bytes(raw[:2], "little")
            if not n:
                continue
            try:
                out.append((i * per_block + j, msgpack.unpackb(raw[2:2 + n])))
            except Exception:
                continue
    return out


def tail_start(nblocks: int) -> int:
    return nblocks - TAIL_BLOCKS


def decision_start(nblocks: int) -> int:
    return tail_start(nblocks) + TABLE_BLOCKS


def replicated_tail(nblocks: int) -> range:
    """The tail blocks that are replicated (and compared between replicas)."""
    return range(tail_start(nblocks), position_block(nblocks))


def position_block(nblocks: int) -> int:
    return nblocks - 1


def pack_position(incarnation: str, lsn: int) -> bytes:
    body = msgpack.packb([incarnation, lsn])
    return (len(body).to_bytes(2, "little") + body).ljust(BLOCK_SIZE, b"\0")


def unpack_position(data: bytes) -> tuple[str, int]:
    n = int.from_bytes(data[:2], "little")
    try:
        inc, lsn = msgpack.unpackb(data[2:2 + n]) if n else ("", 0)
        return str(inc), int(lsn)
    except Exception:
        return "", 0


class AmoTable:
    """The primary's view of the table: lookups from memory, writes through the
    operation's transaction."""

    def __init__(self, nblocks: int):
        self.first = tail_start(nblocks)
        self.entries: dict[tuple[str, int], tuple[int, bytes]] = {}   # key -> (seq, packed reply)
        self.slots: dict[tuple[str, int], int] = {}
        self.free: list[int] = []
        self._clock = 0
        self._used: dict[tuple[str, int], int] = {}

    async def load(self, mgr) -> None:
        """Read the whole table (one read-only transaction)."""
        taken = set()
        for slot, entry in await load_slots(mgr, self.first, TABLE_BLOCKS, SLOT, "amo-load"):
            try:
                client, lane, seq, reply = entry
            except (TypeError, ValueError):
                continue
            key = (client, lane)
            self.entries[key] = (seq, reply)
            self.slots[key] = slot
            self._used[key] = 0         # older than anything used from now on
            taken.add(slot)
        self.free = [s for s in range(TABLE_BLOCKS * SLOTS_PER_BLOCK) if s not in taken][::-1]

    def lookup(self, key) -> tuple[int, bytes] | None:
        return self.entries.get(key)

    def _slot(self, key) -> int:
        slot = self.slots.get(key)
        if slot is None:
            if self.free:
                slot = self.free.pop()
            else:           # full: reuse the least recently used lane's slot
                victim = min(self._used, key=self._used.get)
                slot = self.slots.pop(victim)
                self.entries.pop(victim, None)
                self._used.pop(victim, None)
            self.slots[key] = slot
        self._clock += 1
        self._used[key] = self._clock
        return slot

    async def record(self, txn, key, seq: int, value) -> bytes:
        """Write (key, seq, reply) into the caller's transaction; returns the packed reply.
        Call `remember` once the transaction committed."""
        reply = wire.pack_value(value)
        body = msgpack.packb([key[0], key[1], seq, reply])
        if len(body) + 2 > SLOT:
            raise ValueError(f"reply of {len(body)} bytes does not fit an at-most-once slot")
        slot = self._slot(key)
        blk = self.first + slot // SLOTS_PER_BLOCK
        off = (slot % SLOTS_PER_BLOCK) * SLOT
        await txn.lock(("amo", slot), "X")
        await txn.write(blk, off, (len(body).to_bytes(2, "little") + body).ljust(SLOT, b"\0"))
        return reply

    def remember(self, key, seq: int, reply: bytes) -> None:
        old = self.entries.get(key)
        if old is None or old[0] < seq:
            self.entries[key] = (seq, reply)
