"""The async BlockDevice face of the array: trio tasks, flush, the write-intent bitmap's
cost, and a rebuild running while writes continue."""

from __future__ import annotations

import os
import random
import threading

import pytest
import trio

from replfs.raid import BlockDevice, BlockIOError, create_array, open_array

from .conftest import DISK_SIZE, NDISKS, assert_same, disk_path

pytestmark = pytest.mark.timeout(120)


async def test_implements_blockdevice(array_dir):
    arr = create_array(array_dir, NDISKS, DISK_SIZE)
    try:
        assert isinstance(arr, BlockDevice)
        assert await arr.read_block(7) == bytes(4096)
        await arr.write_blocks({7: b"a" * 4096, 8: b"b" * 4096})
        await arr.flush()
        assert await arr.read_blocks(7, 2) == b"a" * 4096 + b"b" * 4096
        with pytest.raises(ValueError):
            await arr.read_block(arr.nblocks)
        with pytest.raises(ValueError):
            await arr.write_blocks({0: b"short"})
    finally:
        arr.close()


async def test_bitmap_costs_no_fsync_per_write_in_common_case(array_dir):
    arr = create_array(array_dir, NDISKS, DISK_SIZE)
    try:
        rng = random.Random(1)
        for i in range(100):  # commit-like: small batch, flush
            s = rng.randrange(200)
            await arr.write_blocks({s + j: rng.randbytes(4096) for j in range(4)})
            await arr.flush()
        # one region (16 MiB) holds all of these: its bit is set once and stays set
        assert arr.stats["bitmap_syncs"] == 1
        assert arr.stats["flushes"] == 100
        # idle for two flush intervals: the bit is cleared
        await arr.flush()
        await arr.flush()
        assert arr.status()["dirty_regions"] == 0
    finally:
        arr.close()


async def test_flush_lets_other_tasks_run(array_dir):
    arr = create_array(array_dir, NDISKS, DISK_SIZE)
    ticks = 0
    try:
        await arr.write_blocks({i: bytes([i % 256]) * 4096 for i in range(1000)})

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as n:
            n.start_soon(ticker)
            await arr.flush()
            n.cancel_scope.cancel()
        assert ticks > 0
    finally:
        arr.close()


async def test_rebuild_while_writes_continue(array_dir):
    arr = create_array(array_dir, NDISKS, DISK_SIZE)
    ref = bytearray(arr.nblocks * 4096)
    rng = random.Random(3)
    try:
        for s in range(0, arr.nblocks, 256):
            batch = {b: rng.randbytes(4096) for b in range(s, min(arr.nblocks, s + 256))}
            await arr.write_blocks(batch)
            for k, v in batch.items():
                ref[k * 4096:(k + 1) * 4096] = v
        arr.fail_disk(1)
        done = trio.Event()
        writes = 0
        seen_progress = []

        wrote = threading.Event()

        def slow_progress(row, rows):
            # let at least one write land between two rebuild steps (bounded wait)
            seen_progress.append(row)
            wrote.wait(2.0)
            wrote.clear()

        async def writer():
            nonlocal writes
            while not done.is_set():
                s = rng.randrange(arr.nblocks - 40)
                batch = {s + j: rng.randbytes(4096) for j in range(rng.randint(1, 40))}
                await arr.write_blocks(batch)
                for k, v in batch.items():
                    ref[k * 4096:(k + 1) * 4096] = v
                writes += 1
                wrote.set()
                if writes % 10 == 0:
                    await arr.flush()
                # reads during the rebuild are right too
                b = rng.randrange(arr.nblocks)
                assert await arr.read_block(b) == bytes(ref[b * 4096:(b + 1) * 4096])
                await trio.sleep(0)

        async def rebuilder():
            await trio.to_thread.run_sync(lambda: arr.rebuild(1, progress=slow_progress,
                                                              batch_rows=2))
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            n.start_soon(rebuilder)
        assert writes > 20, writes
        assert len(seen_progress) > 10
        assert arr.health() == "healthy"
        assert_same(arr, ref)
        arr.fail_disk(2)  # disk 1 must now carry its share
        assert_same(arr, ref)
    finally:
        arr.close()
    arr = open_array(array_dir)
    try:
        assert_same(arr, ref)
    finally:
        arr.close()


async def test_two_failed_disks_reads_raise_not_lie(array_dir):
    arr = create_array(array_dir, NDISKS, DISK_SIZE)
    try:
        await arr.write_blocks({b: b"q" * 4096 for b in range(0, 96)})
        arr.fail_disk(0)
        os.truncate(disk_path(array_dir, 1), 8 * 4096)  # a second disk dies (short reads)
        g = arr.geo
        for lb in range(0, 96):
            row, role, off = g.locate(lb)
            d = g.data_disk(row, role)
            if d in (0, 1):
                with pytest.raises(BlockIOError):
                    await arr.read_block(lb)
            else:
                assert await arr.read_block(lb) == b"q" * 4096
        assert arr.disks[1].state == "failed" and arr.disks[1].read_errors >= 1
        with pytest.raises(BlockIOError):
            await arr.write_blocks({0: b"w" * 4096})
    finally:
        arr.close()


def test_interrupted_rebuild_resumes(array_dir):
    """A rebuild killed half-way leaves the member "rebuilding": status shows it, reads
    stay right (the unrebuilt part is reconstructed), and a new rebuild finishes it."""
    import subprocess
    import sys

    from replfs.crash import CRASH_EXIT_CODE
    from replfs.raid import inspect_array

    arr = create_array(array_dir, NDISKS, DISK_SIZE)
    ref = bytearray(arr.nblocks * 4096)
    from .conftest import random_writes
    random_writes(arr, ref, random.Random(11), 80)
    arr.fail_disk(2)
    arr.close()
    child = ("import sys; from replfs.raid import open_array; import replfs.raid.rebuild as a; "
             "a.REBUILD_PERSIST_SECS = 0; arr = open_array(sys.argv[1]); "
             "arr.rebuild(2, batch_rows=8)")
    env = dict(os.environ, REPLFS_CRASH_AT="raid.rebuild_step:4")
    p = subprocess.run([sys.executable, "-c", child, array_dir], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == CRASH_EXIT_CODE, p.stderr
    st = inspect_array(array_dir)
    assert st["disks"][2]["state"] == "rebuilding"
    assert 0 < st["disks"][2]["rebuild_progress"] < 1
    arr = open_array(array_dir)
    try:
        assert arr.health() == "rebuilding"
        assert_same(arr, ref)
        arr.rebuild(2)
        arr.fail_disk(0)
        assert_same(arr, ref)
    finally:
        arr.close()
