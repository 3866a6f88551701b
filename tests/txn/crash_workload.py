"""Child process of the crash-point tests (not a test module itself).

    python crash_workload.py IMAGE run      # format + a concurrent workload
    python crash_workload.py IMAGE recover  # only open (recover) and close

IMAGE ending in ".array" is a directory holding a real RAID-5 array (raid/array.py,
3 disks) instead of one FileDevice image file.

Run with REPLFS_CRASH_AT=name[:n] to die at a crash point. Prints ``C i`` (flushed)
after logical transaction i committed, and ``DONE`` at the end. The model that the test
checks is in `Model` below: transaction i sets bit i in the 64-byte bitmap of each of
its slots (a few slots share each block) and writes a redo-only pattern into a block of
its own; every transaction must be found whole (all bits, and the pattern) or absent.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

import trio

from replfs.raid.blockdev import FileDevice
from replfs.txn import TxnManager

NBLOCKS = 160
LOG = dict(log_start=1, log_blocks=12)
CACHE = 6
NTXN = 64
SLOTS = 20
SLOTS_PER_BLOCK = 4
SLOT_BASE = 20
DATA_BASE = 40
TASKS = 4


class Model:
    @staticmethod
    def slots(i: int) -> list[int]:
        return sorted(random.Random(i).sample(range(SLOTS), 3))

    @staticmethod
    def where(slot: int) -> tuple[int, int]:
        return SLOT_BASE + slot // SLOTS_PER_BLOCK, 1000 * (slot % SLOTS_PER_BLOCK)

    @staticmethod
    def pattern(i: int) -> bytes:
        return bytes([i % 251 + 1]) * 1500

    @staticmethod
    def aborts(i: int) -> bool:       # the workload itself aborts these
        return i % 7 == 3

    @staticmethod
    def prepares(i: int) -> bool:     # 2PC participant path: prepare, decide, commit
        return i % 11 == 5


class Boom(Exception):
    pass


async def transaction(mgr: TxnManager, i: int) -> None:
    order = Model.slots(i)
    random.Random(i * 7919).shuffle(order)    # random lock order: deadlocks happen

    async def fn(txn):
        await txn.write(DATA_BASE + i, 100, Model.pattern(i), undo=False)
        for s in order:
            await txn.lock(("slot", s), "X")
            blk, off = Model.where(s)
            bitmap = bytearray(await txn.read(blk, off, 64))
            await trio.sleep(0)
            bitmap[i // 8] |= 1 << (i % 8)
            await txn.write(blk, off, bytes(bitmap))
        if Model.aborts(i):
            raise Boom(i)
        if Model.prepares(i):
            await txn.prepare({"i": i})
            await mgr.log_decision(("g", i), True, [0])
            await txn.commit()
            await mgr.forget_decision(("g", i))

    try:
        await mgr.run(fn, name=f"t{i}")
    except Boom:
        return
    print(f"C {i}", flush=True)


def open_device(image: str, create: bool = False):
    if image.endswith(".array"):
        from replfs.raid import create_array, open_array
        if create:
            shutil.rmtree(image, ignore_errors=True)
            return create_array(image, 3, 1 << 20, chunk=16 * 1024)
        return open_array(image)
    if create and os.path.exists(image):   # a fresh image: no bits left from earlier
        os.unlink(image)
    return FileDevice(image, NBLOCKS if create else None, create=create)


async def run(image: str) -> None:
    dev = open_device(image, create=True)
    await TxnManager.format(dev, **LOG)
    mgr = await TxnManager.open(dev, **LOG, cache_blocks=CACHE)
    todo = list(range(NTXN))

    async def worker():
        while todo:
            i = todo.pop(0)
            await transaction(mgr, i)
            if i % 16 == 15:
                await mgr.checkpoint()

    async with trio.open_nursery() as n:
        for _ in range(TASKS):
            n.start_soon(worker)
    await mgr.close()
    print("DONE", flush=True)


async def recover(image: str) -> None:
    dev = open_device(image)
    mgr = await TxnManager.open(dev, **LOG, cache_blocks=CACHE)
    await mgr.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    image, mode = sys.argv[1], sys.argv[2]
    trio.run(run if mode == "run" else recover, image)
