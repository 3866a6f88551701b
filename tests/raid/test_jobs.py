"""Background rebuild and scrub of an array in use (raid/jobs.py): trio tasks write while
the job runs; pause, cancel (the rebuild keeps its position) and a reopened array whose
jobs resume the rebuild where it stood."""

from __future__ import annotations

import random

import pytest
import trio

from replfs.raid import open_array
from replfs.raid.errors import RaidError
from replfs.raid.jobs import ArrayJobs

from .conftest import assert_same, disk_path

pytestmark = pytest.mark.timeout(120)


async def _writer(arr, ref, rng, stop: trio.Event):
    while not stop.is_set():
        s = rng.randrange(arr.nblocks - 8)
        batch = {s + j: rng.randbytes(4096) for j in range(rng.randint(1, 8))}
        await arr.write_blocks(batch)
        for k, v in batch.items():
            ref[k * 4096:(k + 1) * 4096] = v
        await trio.sleep(0)


async def _until(pred, what: str):
    with trio.fail_after(60):
        while not pred():
            await trio.sleep(0.01)


async def test_rebuild_paused_cancelled_and_resumed_after_reopen(new_array, array_dir):
    arr, ref = new_array
    rng = random.Random(5)
    arr.fail_disk(2)
    async with trio.open_nursery() as n:
        jobs = ArrayJobs(arr, batch_bytes=16 << 10)      # one chunk row per step
        await n.start(jobs.run)
        stop = trio.Event()
        n.start_soon(_writer, arr, ref, rng, stop)
        # slow enough to be caught in the middle: a row per step, 64 KiB/s
        await jobs.start_rebuild(2, speed_min=64 << 10, speed_max=64 << 10)
        with pytest.raises(RaidError, match="rebuild of disk 2 is running"):
            await jobs.start_scrub()
        await _until(lambda: jobs.job.row >= 2, "the first rows")
        jobs.pause()
        await _until(lambda: jobs.job.waiting, "the pause")
        row = jobs.job.row              # (waiting: no step lands until resumed)
        st = jobs.status()
        assert st["state"] == "paused" and st["eta_seconds"] is None
        jobs.resume()
        await _until(lambda: jobs.job.row > row, "the resumed rebuild")
        st = await jobs.cancel()
        assert st["state"] == "cancelled" and 0 < st["row"] < st["rows"]
        stop.set()
        n.cancel_scope.cancel()
    disk = arr.disks[2]
    assert disk.state == "rebuilding" and disk.durable_pos == st["row"]
    arr.close()
    # a new process: the cancelled rebuild is not resumed by itself ...
    arr = open_array(array_dir)
    try:
        assert arr.disks[2].state == "rebuilding"
        assert arr.disks[2].durable_pos == st["row"]
        async with trio.open_nursery() as n:
            jobs = ArrayJobs(arr)
            await n.start(jobs.run)
            assert jobs.job is None
            # ... but started again, it goes on from there, and the array is whole
            await jobs.start_rebuild(2)
            assert jobs.job.first_row == st["row"]
            await _until(lambda: jobs.job.stopped, "the rebuild's end")
            assert jobs.status()["state"] == "done"
            await jobs.start_scrub()
            await _until(lambda: jobs.job.stopped, "the scrub's end")
            n.cancel_scope.cancel()
        found = jobs.status()["result"]
        assert found["unrecoverable"] == 0 and found["parity_mismatches"] == 0
        assert not found["cksum_repaired"]
        assert arr.health() == "healthy"
        assert_same(arr, ref)
    finally:
        arr.close()


async def test_running_rebuild_resumes_after_reopen(new_array, array_dir):
    arr, ref = new_array
    arr.fail_disk(1)
    async with trio.open_nursery() as n:
        jobs = ArrayJobs(arr, batch_bytes=16 << 10)
        await n.start(jobs.run)
        await jobs.start_rebuild(1, speed_min=64 << 10, speed_max=64 << 10)
        await _until(lambda: jobs.job.row >= 3, "the first rows")
        n.cancel_scope.cancel()          # the process stops: the job stays "running"
    at = arr.disks[1].durable_pos
    assert at >= 3
    arr.close()
    arr = open_array(array_dir)
    try:
        async with trio.open_nursery() as n:
            jobs = ArrayJobs(arr)
            await n.start(jobs.run)
            assert jobs.job.kind == "rebuild" and jobs.job.first_row == at
            assert jobs.job.speed_max == 64 << 10     # its limits came back with it
            jobs.set_speed(0, 0)
            await _until(lambda: jobs.job.stopped, "the rebuild's end")
            n.cancel_scope.cancel()
        assert jobs.status()["state"] == "done" and arr.health() == "healthy"
        assert_same(arr, ref)
    finally:
        arr.close()


def _smash(arr, array_dir, lb: int) -> None:
    """Damage logical block `lb` and the same entry of the next member: beyond RAID-5."""
    g = arr.geo
    row, role, off = g.locate(lb)
    d = g.data_disk(row, role)
    at = (g.data_start + row * g.cb + off) * 4096
    for k in (d, (d + 1) % g.ndisks):
        with open(disk_path(array_dir, k), "r+b") as f:
            f.seek(at)
            f.write(b"\x5a" * 4096)


async def test_scrub_asks_heal_for_blocks_beyond_repair(new_array, array_dir):
    """A scrub lists the blocks no parity can restore and asks `heal` for each; what it
    cannot heal stays listed; a scrub after the heal is clean."""
    arr, ref = new_array
    _smash(arr, array_dir, 5)
    _smash(arr, array_dir, 300)
    asked = []

    async def heal(b):
        asked.append(b)
        if b == 300:
            return False
        await arr.write_blocks({b: bytes(ref[b * 4096:(b + 1) * 4096])})
        return True
    async with trio.open_nursery() as n:
        jobs = ArrayJobs(arr, heal=heal)
        await n.start(jobs.run)
        await jobs.start_scrub()
        await _until(lambda: jobs.job.stopped, "the scrub's end")
        res = jobs.status()["result"]
        assert 5 in asked and 300 in asked and res["unrecoverable"] >= 2
        assert res["lost_blocks"] == [300] and res["healed"] == len(asked) - 1, res
        assert arr.scrub_progress["found"]["lost_blocks"] == [300]
        await arr.write_blocks({300: bytes(ref[300 * 4096:301 * 4096])})
        await jobs.start_scrub()
        await _until(lambda: jobs.job.stopped, "the second scrub's end")
        res = jobs.status()["result"]
        assert res["unrecoverable"] == 0 and res["parity_mismatches"] == 0, res
        assert not res["cksum_repaired"] and res["lost_blocks"] == []
        n.cancel_scope.cancel()
    assert_same(arr, ref)
