"""The at-most-once table over a real transaction manager (in process)."""

import pytest

from replfs.fs.core import Attr
from replfs.raid.blockdev import MemoryDevice
from replfs.replication import amo
from replfs.txn import TxnManager

pytestmark = pytest.mark.timeout(30)

NBLOCKS = 2048


async def manager(dev):
    return await TxnManager.open(dev, log_start=1, log_blocks=256)


async def test_replies_survive_reopen_and_lru_evicts_oldest():
    dev = MemoryDevice(NBLOCKS)
    await TxnManager.format(dev, log_start=1, log_blocks=256)
    mgr = await manager(dev)
    t = amo.AmoTable(NBLOCKS)
    await t.load(mgr)
    attr = Attr(5, 0o100644, 1, 0, 0, 0, 3, 8, 1, 2, 3, 4)

    async def record(key, seq, value):
        async def fn(txn):
            return await t.record(txn, key, seq, value)
        t.remember(key, seq, await mgr.run(fn))

    await record(("c", 0), 1, attr)
    await record(("c", 1), 7, 42)
    await record(("c", 0), 2, None)
    await mgr.close()
    dev.crash()                 # only what was forced survives

    mgr = await manager(dev)
    t = amo.AmoTable(NBLOCKS)
    await t.load(mgr)
    seq, reply = t.lookup(("c", 0))
    assert seq == 2
    seq, reply = t.lookup(("c", 1))
    assert (seq, amo.wire.unpack_value(reply)) == (7, 42)
    # fill the table: the loaded entries (never used since) go first
    n = amo.TABLE_BLOCKS * amo.SLOTS_PER_BLOCK
    for i in range(n - 2):
        await record(("d", i), 1, i)
    await record(("new", 0), 1, "x")
    assert t.lookup(("new", 0)) is not None
    assert t.lookup(("d", 0)) is not None           # a recent lane was not evicted
    assert t.lookup(("c", 0)) is None or t.lookup(("c", 1)) is None
    await mgr.close()


def test_position_roundtrip():
    data = amo.pack_position("abc", 123)
    assert len(data) == 4096 and amo.unpack_position(data) == ("abc", 123)
    assert amo.unpack_position(bytes(4096)) == ("", 0)
