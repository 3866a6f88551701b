"""The 2PC coordinator's decisions, kept in the replicated block space.

A distributed operation commits at its coordinator: the coordinator's own part of the
operation, its at-most-once reply and the decision entry ``[gtid, participant groups]``
are one local transaction, replicated to the backup like every other. So the decision
is durable on both replicas of the coordinator's group before any participant hears
it, a failover hands it to the new primary with the rest of the state, and its absence
means abort (presumed abort). The entry is cleared once every participant has
acknowledged the commit.

Layout: `amo.DECISION_BLOCKS` blocks at `amo.decision_start(n)`, SLOTS_PER_BLOCK slots
of SLOT bytes, each a 2-byte length and a msgpack ``[gtid, [groups]]`` (zero: free).
"""

from __future__ import annotations

import msgpack

from replfs.fs.layout import BLOCK_SIZE
from replfs.replication import amo

SLOT = 128
SLOTS_PER_BLOCK = BLOCK_SIZE // SLOT
SLOTS = amo.DECISION_BLOCKS * SLOTS_PER_BLOCK


class TableFull(Exception):
    """Every slot holds an undelivered decision (participants unreachable): retry later."""


class DecisionTable:
    def __init__(self, nblocks: int):
        self.first = amo.decision_start(nblocks)
        self.entries: dict[str, tuple[int, list[int]]] = {}   # gtid -> (slot, groups)
        self.free: list[int] = list(range(SLOTS))[::-1]

    async def load(self, mgr) -> None:
        taken = set()
        for slot, entry in await amo.load_slots(mgr, self.first, amo.DECISION_BLOCKS, SLOT,
                                                "decisions-load"):
            try:
                gtid, groups = entry
                self.entries[str(gtid)] = (slot, [int(g) for g in groups])
            except (TypeError, ValueError):
                continue
            taken.add(slot)
        self.free = [s for s in range(SLOTS) if s not in taken][::-1]

    def _where(self, slot: int) -> tuple[int, int]:
        return self.first + slot // SLOTS_PER_BLOCK, (slot % SLOTS_PER_BLOCK) * SLOT

    async def record(self, txn, gtid: str, groups: list[int]) -> int:
        """Write the entry inside the coordinator's transaction; returns its slot (give
        it back with `release` if the transaction aborts, or `remember` once it is
        replicated)."""
        body = msgpack.packb([gtid, list(groups)])
        if len(body) + 2 > SLOT:
            raise ValueError(f"decision entry of {len(body)} bytes does not fit a slot")
        if not self.free:
            raise TableFull(f"{SLOTS} decisions wait for their participants")
        slot = self.free.pop()
        blk, off = self._where(slot)
        await txn.lock(("decision", slot), "X")
        await txn.write(blk, off, (len(body).to_bytes(2, "little") + body).ljust(SLOT, b"\0"))
        return slot

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.free.append(slot)

    def remember(self, gtid: str, slot: int, groups: list[int]) -> None:
        self.entries[gtid] = (slot, list(groups))

    async def forget(self, mgr, gtid: str) -> None:
        """Clear the entry (its own small transaction) once every participant acked."""
        ent = self.entries.get(gtid)
        if ent is None:
            return
        slot = ent[0]
        blk, off = self._where(slot)

        async def fn(txn):
            await txn.lock(("decision", slot), "X")
            await txn.write(blk, off, bytes(SLOT))
        await mgr.run(fn, name="decision-forget")
        del self.entries[gtid]
        self.free.append(slot)
