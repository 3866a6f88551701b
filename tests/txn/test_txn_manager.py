"""TxnManager over a MemoryDevice: commit/abort, byte ranges sharing a block, steal +
crash, 2PC participant state, replication hooks, log truncation."""

import pytest
import trio

from replfs.raid.blockdev import MemoryDevice
from replfs.txn import (HistoryRecorder, LogCorrupt, TxnAborted, TxnManager,
                        check_serializable)

LOG = dict(log_start=1, log_blocks=16)


async def fresh(nblocks=256, **kw):
    dev = MemoryDevice(nblocks)
    await TxnManager.format(dev, **LOG)
    return dev, await TxnManager.open(dev, **LOG, **kw)


async def reopen(dev, **kw):
    return await TxnManager.open(dev, **LOG, **kw)


async def peek(mgr, block, off=0, n=None):
    return await mgr.run(lambda t: t.read(block, off, n))


async def test_commit_survives_crash_and_uncommitted_vanishes():
    dev, mgr = await fresh()
    t = mgr.begin()
    await t.write(40, 10, b"committed")
    rec = await t.commit(payload={"reply": 1})
    assert rec.changes == ((40, 10, b"committed"),) and rec.payload == {"reply": 1}
    t2 = mgr.begin()
    await t2.write(40, 100, b"uncommitted")
    await mgr.force()              # the loser's UPDATE is durable too
    dev.crash()
    mgr = await reopen(dev)
    assert await peek(mgr, 40, 10, 9) == b"committed"
    assert await peek(mgr, 40, 100, 11) == bytes(11)
    assert mgr.stats()["recovery"]["losers"] == 1


async def test_open_without_format_is_a_clear_error():
    with pytest.raises(LogCorrupt, match="format"):
        await TxnManager.open(MemoryDevice(64), **LOG)


async def test_abort_restores_only_its_own_bytes_of_a_shared_block():
    dev, mgr = await fresh()
    t1, t2 = mgr.begin(), mgr.begin()
    await t1.write(50, 0, b"AAAA")
    await t2.write(50, 8, b"BBBB")
    await t1.write(50, 2, b"aa")
    assert await t1.read(50, 0, 12) == b"AAaa\0\0\0\0BBBB"
    await t1.abort()
    await t2.commit()
    assert await peek(mgr, 50, 0, 12) == bytes(8) + b"BBBB"
    dev.crash()
    mgr = await reopen(dev)
    assert await peek(mgr, 50, 0, 12) == bytes(8) + b"BBBB"


async def test_stolen_page_of_a_loser_is_undone_by_recovery():
    # cache of 4 pages: writing many blocks installs T1's uncommitted page (steal)
    dev, mgr = await fresh(cache_blocks=4)
    loser = mgr.begin()
    await loser.write(60, 0, b"LOSER")
    winner = mgr.begin()
    await winner.write(60, 16, b"WINNER")
    for b in range(61, 70):
        await winner.write(b, 0, b"w%d" % b)
    await winner.commit()
    assert mgr.stats()["cache_installs"] > 0
    dev.crash()      # the stolen page (with LOSER) is only volatile -- make it durable:
    mgr2 = await reopen(dev)
    assert await peek(mgr2, 60, 0, 22) == bytes(16) + b"WINNER"
    assert await peek(mgr2, 69, 0, 3) == b"w69"


async def test_stolen_page_durable_on_disk_is_undone():
    dev, mgr = await fresh(cache_blocks=4)
    loser = mgr.begin()
    await loser.write(60, 0, b"LOSER")
    other = mgr.begin()
    for b in range(61, 70):
        await other.write(b, 0, b"x")
    await other.commit()
    await mgr.checkpoint()           # installs and flushes the loser's page
    assert (await dev.read_block(60))[:5] == b"LOSER"
    dev.crash()
    mgr = await reopen(dev)
    assert await peek(mgr, 60, 0, 5) == bytes(5)


async def test_redo_only_writes_are_not_undone_on_abort():
    dev, mgr = await fresh()
    t = mgr.begin()
    await t.write(70, 0, b"bulk", undo=False)
    await t.write(71, 0, b"meta")
    await t.abort()
    assert await peek(mgr, 70, 0, 4) == b"bulk"
    assert await peek(mgr, 71, 0, 4) == bytes(4)


async def test_run_aborts_and_reraises_other_errors():
    dev, mgr = await fresh()

    async def fail(t):
        await t.lock(("inode", 1))
        await t.write(80, 0, b"half")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await mgr.run(fail)
    assert await peek(mgr, 80, 0, 4) == bytes(4)
    assert mgr.locks.holders(("inode", 1)) == {}
    assert mgr.stats()["aborts"] == 1


async def test_operations_on_finished_txn_raise():
    dev, mgr = await fresh()
    t = mgr.begin()
    await t.commit()
    with pytest.raises(TxnAborted):
        await t.write(80, 0, b"x")
    with pytest.raises(ValueError):
        await mgr.run(lambda t: t.write(2, 0, b"x"))      # the log region
    with pytest.raises(ValueError):
        await mgr.run(lambda t: t.write(80, 4090, b"12345678"))


async def test_prepared_txn_is_in_doubt_after_crash_with_its_locks():
    dev, mgr = await fresh()
    t = mgr.begin()
    await t.lock(("dirent", 1, "a"), "X")
    await t.lock(("inode", 9), "S")
    await t.write(90, 0, b"prepared")
    await t.prepare({"gtid": ("g", 7)})
    dev.crash()
    mgr = await reopen(dev, lock_timeout=0.2)
    (doubt,) = mgr.in_doubt()
    assert doubt.payload == {"gtid": ["g", 7]}
    assert mgr.locks.holders(("dirent", 1, "a")) == {doubt: "X"}
    with pytest.raises(trio.WouldBlock):
        mgr.begin().lock_nowait(("dirent", 1, "a"), "S")
    # still in doubt across another crash and a checkpoint
    await mgr.checkpoint()
    dev.crash()
    mgr = await reopen(dev)
    (doubt,) = mgr.in_doubt()
    assert await peek(mgr, 90, 0, 8) == b"prepared"
    await doubt.abort()
    assert await peek(mgr, 90, 0, 8) == bytes(8)
    dev.crash()
    mgr = await reopen(dev)
    assert mgr.in_doubt() == [] and await peek(mgr, 90, 0, 8) == bytes(8)


async def test_prepared_then_committed_survives():
    dev, mgr = await fresh()
    t = mgr.begin()
    await t.write(91, 0, b"yes")
    await t.prepare(b"p")
    dev.crash()
    mgr = await reopen(dev)
    (doubt,) = mgr.in_doubt()
    rec = await doubt.commit()
    assert rec.payload == b"p" and rec.changes == ((91, 0, b"yes"),)
    dev.crash()
    mgr = await reopen(dev)
    assert mgr.in_doubt() == [] and await peek(mgr, 91, 0, 3) == b"yes"


async def test_decisions_survive_crash_and_truncation_until_forgotten():
    dev, mgr = await fresh()
    await mgr.log_decision(("g", 1), True, [0, 1])
    await mgr.log_decision(("g", 2), False, [0, 2])
    for i in range(300):                  # many checkpoints / truncations
        await mgr.run(lambda t, i=i: t.write(100 + i % 20, 0, bytes(200)))
    assert mgr.stats()["checkpoints"] > 2
    dev.crash()
    mgr = await reopen(dev)
    d = mgr.decisions()
    assert d[("g", 1)].commit is True and d[("g", 2)].participants == [0, 2]
    await mgr.forget_decision(("g", 1))
    await mgr.force()
    dev.crash()
    mgr = await reopen(dev)
    assert list(mgr.decisions()) == [("g", 2)]


async def test_subscribe_and_apply_replicate_in_commit_order():
    dev, primary = await fresh()
    bdev, backup = await fresh()
    feed = primary.subscribe()

    async def writer(i):
        async def fn(t):
            await t.lock(("acct", i % 3))
            await t.write(120 + i % 3, 8 * (i % 5), i.to_bytes(8, "little"))
            return await t.commit(payload=i)
        await primary.run(fn)

    async with trio.open_nursery() as n:
        for i in range(30):
            n.start_soon(writer, i)
    await primary.close()
    lsns, payloads = [], []
    async with feed:
        async for rec in feed:
            lsns.append(rec.lsn)
            payloads.append(rec.payload)
            await backup.apply(rec.changes, rec.payload)
    assert lsns == sorted(lsns) and sorted(payloads) == list(range(30))
    for b in (120, 121, 122):
        assert await peek(backup, b) == await peek(await reopen(dev), b)


async def test_log_never_grows_without_bound_and_state_is_right():
    dev, mgr = await fresh(cache_blocks=16)
    model = {}
    for i in range(2000):
        blk, off = 130 + i % 37, (i * 100) % 3900
        data = i.to_bytes(4, "little") * 25

        async def fn(t):
            await t.write(blk, off, data)
        await mgr.run(fn)
        model[(blk, off)] = data
        assert mgr.log.used <= mgr.log.usable
    st = mgr.stats()
    import json
    json.dumps(st)                       # stats are JSON-able (for `replfs status`)
    assert st["log_bytes_written"] > 5 * st["log_size"]
    assert st["checkpoints"] > 5
    dev.crash()
    mgr = await reopen(dev)
    for (blk, off), data in model.items():
        assert await peek(mgr, blk, off, 100) == data


async def test_full_log_waits_for_checkpoint_instead_of_failing():
    # 64 concurrent writers, each holding two updates, in a log of 15 data blocks:
    # free space runs out while all are live; they wait / retry, never fail.
    dev, mgr = await fresh(cache_blocks=32, checkpoint_at=0.9)

    async def writer(i):
        async def fn(t):
            await t.write(150 + i % 50, 0, bytes([i]) * 300)
            await trio.sleep(0)
            await t.write(150 + i % 50, 400, bytes([i]) * 300)
        for _ in range(5):
            await mgr.run(fn)

    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(writer, i)
    st = mgr.stats()
    assert st["commits"] == 200 and st["log_full_waits"] > 0


async def test_history_of_concurrent_run_is_serializable():
    hist = HistoryRecorder()
    dev, mgr = await fresh(history=hist)

    async def worker(i):
        async def fn(t):
            for k in (i % 4, (i + 1) % 4):
                await t.lock(("k", k), "X")
                v = int.from_bytes(await t.read(200, 8 * k, 8), "little")
                await trio.sleep(0)
                await t.write(200, 8 * k, (v + 1).to_bytes(8, "little"))
        await mgr.run(fn)

    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(worker, i)
    assert check_serializable(hist)
    vals = [int.from_bytes(await peek(mgr, 200, 8 * k, 8), "little") for k in range(4)]
    assert sum(vals) == 80


async def test_transaction_larger_than_the_log_is_refused_not_retried():
    from replfs.txn import TxnTooLarge
    dev, mgr = await fresh()
    calls = 0

    async def huge(t):
        nonlocal calls
        calls += 1
        for b in range(100, 130):
            await t.write(b, 0, bytes([7]) * 4000, undo=False)

    with pytest.raises(TxnTooLarge):
        await mgr.run(huge)
    assert calls == 1
    assert await peek(mgr, 100, 0, 4) == bytes([7]) * 4     # redo-only: not undone
    assert await peek(mgr, 101, 0, 4) in (bytes(4), bytes([7]) * 4)
    # a big but feasible one goes through, with checkpoints making room
    async def big(t):
        for b in range(100, 103):       # ~37 KB of log with undo, in a 56 KB log
            await t.write(b, 0, bytes([9]) * 4000)
    for _ in range(3):
        await mgr.run(big)
    assert await peek(mgr, 102, 0, 4) == bytes([9]) * 4


class SlowFlushDevice(MemoryDevice):
    async def flush(self):
        await trio.sleep(0.005)            # a disk's fsync (virtual time)
        await super().flush()


@pytest.mark.parametrize("group_commit", [True, False])
async def test_group_commit_shares_flushes(autojump_clock, group_commit):
    dev = SlowFlushDevice(256)
    await TxnManager.format(dev, **LOG)
    mgr = await TxnManager.open(dev, **LOG, group_commit=group_commit)
    flushes0 = mgr.stats()["log_flushes"]

    async def writer(w):
        for i in range(10):
            async def fn(t):
                await t.lock(("w", w))
                await t.write(100 + w, 8 * i, i.to_bytes(8, "little"))
            await mgr.run(fn)

    async with trio.open_nursery() as n:
        for w in range(32):
            n.start_soon(writer, w)
    flushes = mgr.stats()["log_flushes"] - flushes0
    if group_commit:
        assert flushes <= 320 // 8, flushes       # many commits per flush
    else:
        assert flushes >= 320, flushes            # one (at least) per commit
    dev.crash()
    mgr = await reopen(dev)
    for w in range(32):
        assert await peek(mgr, 100 + w, 72, 8) == (9).to_bytes(8, "little")


async def test_recovery_scan_across_chunks_and_the_wrap(monkeypatch):
    import replfs.txn.log as logmod
    monkeypatch.setattr(logmod, "SCAN_CHUNK_BLOCKS", 3)
    dev = MemoryDevice(200)
    geo = dict(log_start=0, log_blocks=11)
    await TxnManager.format(dev, **geo)
    mgr = await TxnManager.open(dev, **geo, checkpoint_at=0.9)
    for i in range(400):
        await mgr.run(lambda t, i=i: t.write(50 + i % 9, (i * 50) % 4000, bytes([i % 256]) * 50))
    assert mgr.log.end_lsn > mgr.log.capacity          # wrapped around
    dev.crash()
    mgr = await TxnManager.open(dev, **geo)
    assert mgr.recovery["winners"] > 20
    for i in range(300, 400):
        got = await peek(mgr, 50 + i % 9, (i * 50) % 4000, 50)
        assert got == bytes([i % 256]) * 50


async def test_run_leaves_a_prepared_txn_to_the_coordinator():
    dev, mgr = await fresh()
    stash = []

    async def participant(t):
        await t.lock(("dirent", 2, "b"))
        await t.write(95, 0, b"2pc")
        await t.prepare({"gtid": 1})
        stash.append(t)

    await mgr.run(participant)
    (t,) = stash
    assert t.state == "prepared" and mgr.in_doubt() == [t]
    await mgr.log_decision(1, True, ["g0", "g1"])
    await t.commit()
    assert mgr.in_doubt() == [] and await peek(mgr, 95, 0, 3) == b"2pc"


async def test_a_torn_header_write_falls_back_to_the_other_slot():
    dev, mgr = await fresh()
    await mgr.run(lambda t: t.write(96, 0, b"before"))
    await mgr.checkpoint()
    await mgr.run(lambda t: t.write(96, 8, b"after"))
    seq = mgr.log.header.seq
    newest = LOG["log_start"] + seq % 2
    dev.crash()
    dev._durable[newest] = b"\xff" * 100 + (await dev.read_block(newest))[100:]   # torn
    mgr = await reopen(dev)
    assert await peek(mgr, 96, 0, 13) == b"before\0\0after"
    # both slots damaged: a clear error, not a guess
    dev.crash()
    for slot in (0, 1):
        dev._durable[LOG["log_start"] + slot] = bytes(4096)
    with pytest.raises(LogCorrupt):
        await reopen(dev)


async def test_log_failure_refuses_writes_but_serves_reads_and_releases_locks():
    from replfs.txn import TxnManagerFailed

    class FailingDevice(MemoryDevice):
        broken = False

        async def flush(self):
            if self.broken:
                raise OSError(5, "disk gone")
            await super().flush()

    dev = FailingDevice(256)
    await TxnManager.format(dev, **LOG)
    mgr = await TxnManager.open(dev, **LOG, lock_timeout=1)

    async def put(t, data):
        await t.lock(("inode", 1))
        await t.write(97, 0, data)

    await mgr.run(lambda t: put(t, b"good"))
    dev.broken = True
    with pytest.raises(TxnManagerFailed):
        await mgr.run(lambda t: put(t, b"lost"))
    assert mgr.failed and mgr.stats()["failed"]
    assert mgr.locks.holders(("inode", 1)) == {}

    async def get(t):
        await t.lock(("inode", 1), "S")
        return await t.read(97, 0, 4)
    assert await mgr.run(get) == b"good"          # the failed commit is not visible
    with pytest.raises(TxnManagerFailed):
        await mgr.run(lambda t: put(t, b"more"))
    await mgr.close()
    dev.broken = False
    dev.crash()
    mgr = await reopen(dev)
    assert await peek(mgr, 97, 0, 4) in (b"good", b"lost")     # whole either way


async def test_lazy_commit_is_visible_at_once_durable_after_force():
    """commit(durable=False): released and visible at once; lost whole on a crash before
    the next force; durable after force(); a later durable commit covers earlier lazy ones."""
    from replfs.raid.blockdev import MemoryDevice
    from replfs.txn import TxnManager

    dev = MemoryDevice(256)
    await TxnManager.format(dev, log_start=1, log_blocks=64)
    mgr = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    t = mgr.begin()
    await t.lock("a", "X")
    await t.write(100, 0, b"lazy-1")
    flushes = dev.flushes
    await t.commit(durable=False)
    assert dev.flushes == flushes, "a lazy commit must not flush"
    t2 = mgr.begin()
    await t2.lock("a", "X")               # the lock was released at commit
    assert (await t2.read(100, 0, 6)) == b"lazy-1"
    await t2.abort()
    dev.crash()
    mgr2 = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    t = mgr2.begin()
    assert (await t.read(100, 0, 6)) == bytes(6), "an unforced lazy commit survived a crash"
    await t.write(100, 0, b"lazy-2")
    await t.commit(durable=False)
    t = mgr2.begin()
    await t.write(101, 0, b"durable")
    await t.commit()                      # forces the log: covers the lazy one before it
    dev.crash()
    mgr3 = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    t = mgr3.begin()
    assert (await t.read(100, 0, 6)) == b"lazy-2"
    assert (await t.read(101, 0, 7)) == b"durable"
    await t.write(102, 0, b"forced")
    await t.commit(durable=False)
    await mgr3.force()
    dev.crash()
    mgr4 = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    t = mgr4.begin()
    assert (await t.read(102, 0, 6)) == b"forced"
    await t.abort()
    await mgr4.close()


async def test_checkpoint_keeps_the_log_of_a_txn_aborting_during_it(autojump_clock):
    # Regression: a transaction that aborts while the CHECKPOINT record is being forced
    # has CLRs that are not durable yet; truncating past its first update would leave
    # its early (installed) updates with nobody to undo them after a crash.
    dev = SlowFlushDevice(256)
    await TxnManager.format(dev, **LOG)
    mgr = await TxnManager.open(dev, **LOG)
    loser = mgr.begin()
    await loser.write(110, 0, b"early")               # before the checkpoint's redo point
    await mgr.run(lambda t: t.write(111, 0, b"other"))
    e0 = mgr.log.end_lsn

    async def abort_while_record_is_forced():
        while mgr.log.end_lsn == e0:                  # until the CHECKPOINT is appended
            await trio.sleep(0.001)
        await trio.sleep(0.001)                       # inside the record's flush
        await loser.abort()                            # CLR + ABORT: in memory only

    async with trio.open_nursery() as n:
        n.start_soon(abort_while_record_is_forced)
        await mgr.checkpoint()
    assert (await dev.read_block(110))[:5] == b"early"      # installed by the checkpoint
    dev.crash()                                              # the CLR never got out
    mgr = await reopen(dev)
    assert await peek(mgr, 110, 0, 5) == bytes(5)
    assert await peek(mgr, 111, 0, 5) == b"other"


async def test_written_commit_survives_a_process_crash_not_a_power_loss():
    """mgr.write() after a lazy commit: the log is in the device (its volatile layer: an
    image file's page cache) without a flush, so a new manager on the same device --
    a restarted process -- recovers it; a power loss (`crash()`) still takes it; a lazy
    commit that was never written is gone even for a process crash."""
    dev = MemoryDevice(256)
    await TxnManager.format(dev, log_start=1, log_blocks=64)
    mgr = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    t = mgr.begin()
    await t.write(100, 0, b"written")
    await t.commit(durable=False)
    flushes = dev.flushes
    await mgr.write()
    assert dev.flushes == flushes, "write() must not flush"
    assert mgr.stats()["written_lsn"] > mgr.stats()["durable_lsn"]
    t = mgr.begin()
    await t.write(101, 0, b"appended")
    await t.commit(durable=False)       # appended only: in this process's memory
    # the process dies (kill -9): nothing of `mgr` runs again; the device's files stay
    mgr2 = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    assert await peek(mgr2, 100, 0, 7) == b"written"
    assert await peek(mgr2, 101, 0, 8) == bytes(8)
    t = mgr2.begin()
    await t.write(102, 0, b"power")
    await t.commit(durable=False)
    await mgr2.write()
    dev.crash()                         # power loss: only what was flushed
    mgr3 = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    assert await peek(mgr3, 102, 0, 5) == bytes(5)
    await mgr3.close()


async def test_on_commit_hooks_run_in_commit_order_before_the_locks_go():
    """A layer above caches committed state through `on_commit`: the hook of a commit
    runs before its locks are released, so a later writer of the same object (waiting
    for the lock) always reports after it -- lazy or forced, never out of order."""
    from replfs.raid.blockdev import MemoryDevice
    from replfs.txn import TxnManager

    dev = MemoryDevice(256)
    await TxnManager.format(dev, log_start=1, log_blocks=64)
    mgr = await TxnManager.open(dev, log_start=1, log_blocks=64, cache_blocks=64)
    seen = []

    async def writer(tag, durable):
        async def fn(t):
            await t.lock("obj", "X")
            await t.write(100, 0, tag)
            t.on_commit.append(lambda: seen.append(tag))
            await trio.sleep(0)
            await t.commit(durable=durable)
        await mgr.run(fn)

    async with trio.open_nursery() as n:
        for i in range(6):
            n.start_soon(writer, b"w%d" % i, i % 2 == 0)
    assert len(seen) == 6
    t = mgr.begin()
    await t.lock("obj", "S")
    assert await t.read(100, 0, 2) == seen[-1]      # the last hook is the last value
    await t.abort()
    await mgr.close()


async def test_fresh_blocks_go_in_place_before_commit_and_never_under_older_records():
    """Ordered mode (`write_fresh`): a fresh block is written in place, unlogged, before
    its COMMIT; a crash before the commit leaves nothing committed; after a durable
    commit the bytes are there though the log never held them. A block logged since
    the last checkpoint (it was metadata, then freed) is logged instead: recovery
    would otherwise redo its old records over the new bytes."""
    dev, mgr = await fresh()        # (recovery at open ends with a checkpoint)
    bs = dev.block_size
    # block 70 was metadata (logged), is reused as fresh data without a checkpoint between
    t = mgr.begin()
    await t.write(70, 0, b"old metadata")
    await t.commit()
    t = mgr.begin()
    await t.write_fresh(70, b"n" * bs)
    await t.write_fresh(71, b"f" * bs)
    rec = await t.commit()
    assert mgr.stats()["fresh_logged"] == 1 and mgr.stats()["fresh_blocks"] == 1
    assert [(c.block, c.fresh) for c in rec.changes] == [(70, False), (71, True)]
    log_writes = dev.writes

    # a fresh write that never commits: nothing of it is committed after a crash
    t = mgr.begin()
    await t.write_fresh(72, b"x" * bs)
    assert await t.read(72, 0, 3) == b"xxx"        # the transaction sees its own bytes
    await t.write(73, 0, b"pointer to 72")
    await mgr.force()
    assert dev.writes >= log_writes
    dev.crash()
    mgr = await reopen(dev)
    assert await peek(mgr, 70) == b"n" * bs        # not the old record's bytes
    assert await peek(mgr, 71) == b"f" * bs        # in place, though never logged
    assert await peek(mgr, 73, 0, 13) == bytes(13)  # the loser is undone

    # after a checkpoint, a block logged before it may take fresh writes again
    await mgr.checkpoint()
    t = mgr.begin()
    await t.write_fresh(70, b"m" * bs)
    await t.write(70, 0, b"partly")                 # then changed in part: logged whole
    await t.write_fresh(74, b"z" * bs)
    await t.commit(durable=False)
    await mgr.force()
    dev.crash()
    mgr = await reopen(dev)
    assert await peek(mgr, 70) == b"partly" + b"m" * (bs - 6)
    assert await peek(mgr, 74) == b"z" * bs
    assert (await check_fresh_apply(mgr)) == b"q" * bs


async def check_fresh_apply(mgr):
    """A backup applies a fresh change in place too (flagged as the primary sent it)."""
    await mgr.checkpoint()
    rec = await mgr.apply([[80, 0, b"q" * mgr.device.block_size, 1], [81, 0, b"meta"]])
    assert [c.fresh for c in rec.changes] == [False, True]
    return await peek(mgr, 80)


class ThreadedDevice(MemoryDevice):
    """A MemoryDevice that also takes writes from a worker thread (`write_sync`, as the
    array does), recording the order in which blocks reach it."""

    def __init__(self, nblocks):
        super().__init__(nblocks)
        self.order: list[int] = []
        self.gate = None        # a threading.Event the worker waits for, when set

    def write_sync(self, blocks):
        if self.gate is not None:
            self.gate.wait(10)
        for n, data in blocks.items():
            self._volatile[n] = bytes(data)
            self.order.append(n)

    async def write_blocks(self, blocks):
        await super().write_blocks(blocks)
        self.order.extend(blocks)


async def test_log_hold_keeps_later_records_in_memory_until_released():
    """`Log.hold`: records appended after a hold are not written, by anyone, until the
    hold is released; a written-only force waits for it, and records before it go."""
    dev, mgr = await fresh()
    log = mgr.log
    t = mgr.begin()
    await t.write(40, 0, b"before")
    await t.commit(durable=False)
    token = log.hold()
    held_from = log.end_lsn
    t = mgr.begin()
    await t.write(41, 0, b"after")
    await t.commit(durable=False)
    done = trio.Event()

    async def writer():
        await mgr.write()
        done.set()
    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set() and log.written_lsn == held_from
        log.release(token)
        await done.wait()
    assert log.written_lsn == log.end_lsn
    mgr2 = await reopen(dev)            # a process crash: what was written is there
    assert await peek(mgr2, 41, 0, 5) == b"after"


async def test_fresh_data_behind_a_published_commit_reaches_the_device_first():
    """A manager that publishes at append (a replicating primary) appends a large
    transaction's COMMIT, and publishes it, before its fresh blocks are written (in a
    worker thread); the log holds the COMMIT back until they are in place, so the
    device never has the commit without the data."""
    import threading
    from replfs.txn.manager import FRESH_BEHIND_BLOCKS
    dev = ThreadedDevice(512)
    await TxnManager.format(dev, **LOG)
    mgr = await TxnManager.open(dev, **LOG)
    mgr.publish_at_append = True
    feed = mgr.subscribe()
    bs = dev.block_size
    dev.gate = threading.Event()
    blocks = list(range(200, 200 + FRESH_BEHIND_BLOCKS))

    async def commit():
        t = mgr.begin()
        for b in blocks:
            await t.write_fresh(b, bytes([b % 251]) * bs)
        await t.write(100, 0, b"size")
        await t.commit(durable=False)
        await mgr.write()
    async with trio.open_nursery() as n:
        n.start_soon(commit)
        rec = await feed.receive()      # published while the data is still on its way
        assert [c.block for c in rec.changes if c.fresh] == blocks
        assert not any(b in dev.order for b in blocks)
        assert mgr.log.written_lsn <= rec.lsn      # the COMMIT is not in the device
        dev.gate.set()
    # the write that carried the COMMIT (the last log write) came after the data
    is_log = [LOG["log_start"] <= b < LOG["log_start"] + LOG["log_blocks"] for b in dev.order]
    last_log = len(is_log) - 1 - is_log[::-1].index(True)
    assert mgr.log.written_lsn > rec.lsn
    assert all(dev.order.index(b) < last_log for b in blocks)
    mgr2 = await reopen(dev)
    assert await peek(mgr2, 100, 0, 4) == b"size"
    assert await peek(mgr2, blocks[-1]) == bytes([blocks[-1] % 251]) * bs


async def test_apply_redo_is_one_record_whole_after_a_crash():
    """`apply_redo` (a backup's batch): lazily committed in one REDO record, visible at
    once, written by `write()` (a process crash keeps it), forced by `force()`, redone by
    recovery; a fresh change goes in place, unless its block was logged since the last
    checkpoint."""
    dev, mgr = await fresh()
    bs = dev.block_size
    t = mgr.begin()
    await t.write(90, 0, b"was metadata")
    await t.commit()
    lsn = await mgr.apply_redo([(60, 5, b"hello"), (61, 0, b"x" * bs, 1), (90, 0, b"y" * bs, 1),
                                (60, 100, b"world")])
    assert lsn > 0 and mgr.stats()["fresh_blocks"] == 1
    assert await peek(mgr, 60, 5, 5) == b"hello" and await peek(mgr, 60, 100, 5) == b"world"
    await mgr.write()
    mgr2 = await reopen(dev)            # kill -9: written records and fresh data stay
    assert await peek(mgr2, 60, 0, 10) == bytes(5) + b"hello"
    assert await peek(mgr2, 61) == b"x" * bs and await peek(mgr2, 90) == b"y" * bs
    await mgr2.apply_redo([(62, 0, b"lost")])      # never written: gone after a crash
    await mgr2.apply_redo([(63, 0, b"kept")])
    await mgr2.force()
    await mgr2.apply_redo([(64, 0, b"unforced")])
    await mgr2.write()
    dev.crash()                         # power loss: what was forced
    mgr3 = await reopen(dev)
    assert await peek(mgr3, 63, 0, 4) == b"kept" and await peek(mgr3, 64, 0, 8) == bytes(8)
    assert await peek(mgr3, 60, 100, 5) == b"world"
    assert mgr3.stats()["recovery"]["redone"] >= 1
