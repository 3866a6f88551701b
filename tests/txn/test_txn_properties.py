"""Model-based crash tests in-process: random interleavings of transactions over a
MemoryDevice, power cuts at random device operations (the batch being written lands
in any subset of its blocks, as do earlier unflushed page installs), then recovery.

Each transaction writes 16-byte cells it X-locks (the caller's side of the contract:
live transactions never write overlapping bytes). After recovery the cells must equal
the model of committed transactions; a transaction whose commit was cut in the middle
must be all there or not at all.
"""

import random

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replfs.raid.blockdev import MemoryDevice
from replfs.txn import TxnManager, TxnManagerFailed

LOG = dict(log_start=0, log_blocks=10)
BLOCKS = range(20, 26)
CELLS = 8


class PowerCut(Exception):
    pass


class CuttableDevice(MemoryDevice):
    """A MemoryDevice that loses power at its `cut_at`-th write or flush."""

    def __init__(self, nblocks):
        super().__init__(nblocks)
        self.ops = 0
        self.cut_at = None

    def _tick(self):
        self.ops += 1
        if self.cut_at is not None and self.ops >= self.cut_at:
            self.cut_at = None
            raise PowerCut

    async def write_blocks(self, blocks):
        await super().write_blocks(blocks)   # the batch is in the volatile layer ...
        self._tick()                          # ... and power goes before it returns

    async def flush(self):
        self._tick()
        await super().flush()


op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.sampled_from(list(BLOCKS)),
              st.integers(0, CELLS - 1), st.integers(1, 255)),
    st.tuples(st.just("commit"), st.integers(0, 2)),
    st.tuples(st.just("abort"), st.integers(0, 2)),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("cut"), st.integers(1, 6), st.integers(0, 2 ** 32)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=5, max_size=60), seed=st.integers(0, 2 ** 32))
def test_random_histories_survive_power_cuts(ops, seed):
    trio.run(_run, ops, seed)


async def _run(ops, seed):
    rng = random.Random(seed)
    dev = CuttableDevice(64)
    await TxnManager.format(dev, **LOG)
    mgr = await TxnManager.open(dev, **LOG, cache_blocks=4)
    model = {}                       # (block, cell) -> byte value, committed
    open_txns = {}                   # slot -> (txn, {(block, cell): value})

    async def cut_and_recover(uncertain):
        nonlocal mgr
        dev.crash(keep=lambda n: rng.random() < 0.5)
        dev.cut_at = None
        mgr = await TxnManager.open(dev, **LOG, cache_blocks=4)
        state = await snapshot()
        if uncertain:
            applied = {k: v for k, v in uncertain.items() if state[k] == v}
            changed = {k for k, v in uncertain.items() if model.get(k, 0) != v}
            landed = {k for k in changed if k in applied}
            assert landed in (set(), changed), f"commit half applied: {landed} of {changed}"
            if landed:
                model.update(uncertain)
        assert state == {k: model.get(k, 0) for k in state}
        open_txns.clear()

    async def snapshot():
        async def fn(txn):
            out = {}
            for b in BLOCKS:
                data = await txn.read(b)
                for c in range(CELLS):
                    out[(b, c)] = data[16 * c]
            return out
        return await mgr.run(fn)

    for o in ops:
        kind = o[0]
        try:
            if kind == "write":
                _, slot, b, c, v = o
                if slot not in open_txns:
                    open_txns[slot] = (mgr.begin(), {})
                txn, writes = open_txns[slot]
                try:
                    txn.lock_nowait(("cell", b, c))
                except trio.WouldBlock:
                    continue
                await txn.write(b, 16 * c, bytes([v]) * 16)
                writes[(b, c)] = v
            elif kind in ("commit", "abort") and o[1] in open_txns:
                txn, writes = open_txns.pop(o[1])
                if kind == "commit":
                    try:
                        await txn.commit()
                    except (PowerCut, TxnManagerFailed):
                        await cut_and_recover(writes)
                        continue
                    model.update(writes)
                else:
                    await txn.abort()
            elif kind == "checkpoint":
                await mgr.checkpoint()
            elif kind == "cut":
                dev.cut_at = dev.ops + o[1]
                rng.seed(o[2])
        except (PowerCut, TxnManagerFailed):
            await cut_and_recover(None)
    dev.cut_at = None
    await cut_and_recover(None)
