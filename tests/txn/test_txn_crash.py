"""Recovery at every crash point of the transaction layer.

A child process (crash_workload.py) runs a concurrent workload over a FileDevice image
and dies (os._exit) at a named crash point; the test then recovers the image in-process
and checks the model: every transaction whole or absent, every reported commit whole,
every self-aborted transaction absent, prepared transactions in doubt and whole.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import trio

from replfs.crash import CRASH_EXIT_CODE
from replfs.raid.blockdev import FileDevice
from replfs.txn import TxnManager
from replfs.txn.log import Log
from replfs.txn.records import FRAME_SIZE

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import crash_workload as W  # noqa: E402

# Every step of commit, install, checkpoint, truncation, 2PC and abort that the workload
# must pass; recovery's own points are exercised by the crash-during-recovery test.
EXPECTED_POINTS = {
    "txn.write.logged", "txn.commit.appended", "txn.log.written", "txn.log.flushed",
    "txn.commit.durable", "txn.abort.clr", "txn.abort.logged",
    "txn.install.before_write", "txn.install.written",
    "txn.checkpoint.begin", "txn.checkpoint.installed", "txn.checkpoint.flushed",
    "txn.checkpoint.logged", "txn.log.header_written", "txn.checkpoint.truncated",
    "txn.prepare.appended", "txn.prepare.durable", "txn.decision.appended",
    "txn.decision.durable",
    "txn.recovery.scanned", "txn.recovery.epoch", "txn.recovery.redone",
    "txn.recovery.undone", "txn.recovery.done",
}
RECOVERY_POINTS = {"txn.recovery.scanned", "txn.recovery.epoch", "txn.recovery.redone",
                   "txn.recovery.undo", "txn.recovery.undone", "txn.recovery.done"}

_limit = None


async def child(image, mode, crash_at=None, crash_log=None):
    """Run the workload child; returns (exit code, set of reported commits)."""
    global _limit
    if _limit is None:
        _limit = trio.CapacityLimiter(2)
    env = dict(os.environ)
    env.pop("REPLFS_CRASH_AT", None)
    env.pop("REPLFS_CRASH_LOG", None)
    if crash_at:
        env["REPLFS_CRASH_AT"] = crash_at
    if crash_log:
        env["REPLFS_CRASH_LOG"] = str(crash_log)
    async with _limit:
        proc = await trio.run_process([sys.executable, str(HERE / "crash_workload.py"),
                                       str(image), mode], env=env, check=False,
                                      capture_stdout=True, capture_stderr=True)
    if proc.returncode not in (0, CRASH_EXIT_CODE):
        raise AssertionError(f"workload failed ({proc.returncode}):\n{proc.stderr.decode()}")
    lines = proc.stdout.decode().split()
    committed = {int(x) for tag, x in zip(lines, lines[1:]) if tag == "C"}
    return proc.returncode, committed


def count_points(crash_log):
    counts = {}
    for name in Path(crash_log).read_text().split():
        counts[name] = counts.get(name, 0) + 1
    return counts


async def read_state(mgr):
    async def fn(txn):
        slots = {}
        for s in range(W.SLOTS):
            blk, off = W.Model.where(s)
            slots[s] = int.from_bytes(await txn.read(blk, off, 64), "little")
        data = {i: await txn.read(W.DATA_BASE + i, 100, 1500) for i in range(W.NTXN)}
        return slots, data
    return await mgr.run(fn, name="check")


def verify(state, committed, in_doubt=()):
    slots, data = state
    for s, bits in slots.items():
        assert bits >> W.NTXN == 0, f"slot {s}: bits of unknown transactions"
    for i in range(W.NTXN):
        present = {s for s in range(W.SLOTS) if slots[s] >> i & 1}
        whole = set(W.Model.slots(i))
        assert present in (set(), whole), f"txn {i} half done: {present} of {whole}"
        if i in committed or i in in_doubt:
            assert present == whole, f"txn {i} committed (or in doubt) but absent"
        if W.Model.aborts(i):
            assert not present, f"txn {i} aborted but present"
        if present:
            assert data[i] == W.Model.pattern(i), f"txn {i}: redo-only data missing"


async def recover_and_check(image, committed):
    dev = W.open_device(str(image))
    try:
        mgr = await TxnManager.open(dev, **W.LOG, cache_blocks=W.CACHE)
        first = mgr.recovery
        doubt = mgr.in_doubt()
        in_doubt = {t.payload["i"] for t in doubt}
        assert not in_doubt & committed
        verify(await read_state(mgr), committed, in_doubt)
        for t in doubt:                # the coordinator would answer; here: abort
            await t.abort()
        verify(await read_state(mgr), committed)
        await mgr.close()
        # and the result is stable across another open
        mgr = await TxnManager.open(dev, **W.LOG, cache_blocks=W.CACHE)
        assert mgr.in_doubt() == []
        verify(await read_state(mgr), committed)
        await mgr.close()
        return first
    finally:
        dev.close()


@pytest.fixture(scope="module")
def point_counts(tmp_path_factory):
    d = tmp_path_factory.mktemp("points")
    log = d / "points.txt"

    async def go():
        rc, committed = await child(d / "img", "run", crash_log=log)
        assert rc == 0 and len(committed) == W.NTXN - sum(map(W.Model.aborts, range(W.NTXN)))
    trio.run(go)
    return count_points(log)


def test_workload_passes_every_crash_point(point_counts):
    missing = EXPECTED_POINTS - set(point_counts)
    assert not missing, f"crash points never reached: {missing}"


async def test_recovery_at_every_crash_point(point_counts, tmp_path):
    runs = []
    for name, count in sorted(point_counts.items()):
        for n in sorted({1, (count + 1) // 2, count}):
            runs.append(f"{name}:{n}")
    crashed = []

    async def one(spec):
        image = tmp_path / spec.replace(":", "_")
        rc, committed = await child(image, "run", crash_at=spec)
        if rc == CRASH_EXIT_CODE:
            crashed.append(spec)
        try:
            await recover_and_check(image, committed)
        except AssertionError as exc:
            raise AssertionError(f"after crash at {spec}: {exc}") from exc
        image.unlink()

    async with trio.open_nursery() as n:
        for spec in runs:
            n.start_soon(one, spec)
    # scheduling varies a little between runs, so a late occurrence may not come
    assert len(crashed) >= 0.8 * len(runs), (len(crashed), len(runs))
    assert {s.split(":")[0] for s in crashed} >= EXPECTED_POINTS - RECOVERY_POINTS


async def test_crash_during_recovery_is_recovered_again(tmp_path):
    # First a crash that leaves losers in the log (stolen pages, partial transactions).
    base = tmp_path / "base"
    candidates = [f"{p}:{n}" for n in (150, 90, 200, 60, 120, 40)
                  for p in ("txn.write.logged", "txn.install.written", "txn.log.written")]
    for spec in candidates:
        rc, committed = await child(base, "run", crash_at=spec)
        if rc != CRASH_EXIT_CODE:      # this run did not pass the point that often
            continue
        probe = tmp_path / "probe"
        shutil.copy(base, probe)
        log = tmp_path / "rec_points.txt"
        log.unlink(missing_ok=True)
        rc, _ = await child(probe, "recover", crash_log=log)
        assert rc == 0
        counts = count_points(log)
        if counts.get("txn.recovery.undo", 0) >= 1:
            break
    else:
        pytest.fail("no crash left losers to undo")
    assert RECOVERY_POINTS <= set(counts)
    specs = [f"{name}:{n}" for name, c in sorted(counts.items()) for n in sorted({1, c})]

    async def one(spec):
        image = tmp_path / ("r_" + spec.replace(":", "_"))
        shutil.copy(base, image)
        rc, _ = await child(image, "recover", crash_at=spec)
        assert rc == CRASH_EXIT_CODE, spec
        # and crash the second recovery at the same point, if it gets there (it may
        # have less to do: the first one's CLRs are in the log)
        await child(image, "recover", crash_at=spec)
        try:
            await recover_and_check(image, committed)
        except AssertionError as exc:
            raise AssertionError(f"after crashes in recovery at {spec}: {exc}") from exc

    async with trio.open_nursery() as n:
        for spec in specs:
            n.start_soon(one, spec)


async def test_torn_tail_is_ignored(tmp_path):
    image = tmp_path / "torn"
    rc, committed = await child(image, "run", crash_at="txn.log.written:25")
    assert rc == CRASH_EXIT_CODE
    dev = FileDevice(image)
    log = Log(dev, **W.LOG)
    await log.read_header()
    records = await log.scan()
    lsn, end, _ = records[-1]
    # flip one byte in the middle of the last record's body, as a torn write would
    pos = lsn + FRAME_SIZE + (end - lsn - FRAME_SIZE) // 2
    blk = log.data_start + (pos // log.bs) % log.data_blocks
    raw = bytearray(await dev.read_block(blk))
    raw[pos % log.bs] ^= 0xFF
    await dev.write_blocks({blk: bytes(raw)})
    # and put a stale-looking garbage block right behind the end of the log
    nxt = log.data_start + (end // log.bs + 1) % log.data_blocks
    await dev.write_blocks({nxt: os.urandom(log.bs)})
    dev.close()
    # recover_and_check verifies every reported commit survived and all is whole or
    # absent. (`committed` holds workload item numbers, not transaction ids, so the
    # torn record's txn id cannot be compared with it.)
    recovery = await recover_and_check(image, committed)
    assert recovery["records"] == len(records) - 1


async def test_crash_and_recovery_over_the_raid5_array(tmp_path):
    # the same workload over the real array (3 image files, parity, checksums)
    for spec in ("txn.commit.appended:20", "txn.install.written:30",
                 "txn.checkpoint.flushed:2", "txn.abort.clr:3"):
        image = tmp_path / (spec.replace(":", "_") + ".array")
        rc, committed = await child(image, "run", crash_at=spec)
        assert rc == CRASH_EXIT_CODE, spec
        try:
            await recover_and_check(image, committed)
        except AssertionError as exc:
            raise AssertionError(f"array, after crash at {spec}: {exc}") from exc


@pytest.mark.soak
async def test_soak_recovery_at_random_occurrences(point_counts, tmp_path):
    # every crash point at many random occurrences (run with --soak)
    import random
    rng = random.Random(os.getpid())
    runs = [f"{name}:{rng.randint(1, count)}" for name, count in sorted(point_counts.items())
            for _ in range(8)]

    async def one(i, spec):
        image = tmp_path / f"s{i}"
        _, committed = await child(image, "run", crash_at=spec)
        try:
            await recover_and_check(image, committed)
        except AssertionError as exc:
            raise AssertionError(f"after crash at {spec}: {exc}") from exc
        image.unlink()

    async with trio.open_nursery() as n:
        for i, spec in enumerate(runs):
            n.start_soon(one, i, spec)
