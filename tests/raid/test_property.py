"""Model-based tests: whatever happens to one disk, reads give the reference bytes."""

from __future__ import annotations

import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replfs.raid import BlockIOError, create_array, open_array
from replfs.tools.fault import corrupt

from .conftest import DISK_SIZE, NDISKS, assert_same, disk_path, random_writes

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

ops = st.lists(st.tuples(st.integers(0, 2975), st.integers(1, 40), st.integers(0, 2**32)),
               min_size=1, max_size=25)


def apply(arr, ref, oplist):
    for start, count, seed in oplist:
        rng = random.Random(seed)
        count = min(count, arr.nblocks - start)
        batch = {start + i: rng.randbytes(4096) for i in range(count)}
        arr.write_sync(batch)
        for k, v in batch.items():
            ref[k * 4096:(k + 1) * 4096] = v


@pytest.fixture
def workdir(tmp_path):
    counter = iter(range(10**6))

    def fresh():
        d = tmp_path / f"a{next(counter)}"
        return str(d)
    return fresh


@SETTINGS
@given(oplist=ops)
def test_healthy_random_writes(workdir, oplist):
    d = workdir()
    arr = create_array(d, NDISKS, DISK_SIZE)
    try:
        ref = bytearray(arr.nblocks * 4096)
        apply(arr, ref, oplist)
        assert_same(arr, ref)
        for start, count, _ in oplist[:5]:  # partial reads too
            count = min(count, arr.nblocks - start)
            assert arr.read_sync(start, count) == bytes(ref[start * 4096:(start + count) * 4096])
        arr.close()
        arr = open_array(d)
        assert_same(arr, ref)
    finally:
        arr.close()
    shutil.rmtree(d)


@pytest.mark.parametrize("k", range(NDISKS))
@SETTINGS
@given(before=ops, during=ops)
def test_each_disk_missing_then_rebuilt(workdir, k, before, during):
    d = workdir()
    arr = create_array(d, NDISKS, DISK_SIZE)
    ref = bytearray(arr.nblocks * 4096)
    try:
        apply(arr, ref, before)
        arr.close()
        os.remove(disk_path(d, k))  # the disk is gone
        arr = open_array(d)
        assert arr.health() == "degraded"
        assert_same(arr, ref)
        apply(arr, ref, during)  # writes keep parity right while degraded
        assert_same(arr, ref)
        arr.close()
        arr = open_array(d)
        assert_same(arr, ref)
        arr.rebuild(k)
        assert arr.health() == "healthy"
        assert_same(arr, ref)
        # the rebuilt disk must hold correct data and parity: lose another one
        arr.fail_disk((k + 1) % NDISKS)
        assert_same(arr, ref)
    finally:
        arr.close()
    shutil.rmtree(d)


@pytest.mark.parametrize("area", ["data", "parity", "checksum", "bitmap", "superblock", "any"])
@SETTINGS
@given(seed=st.integers(0, 2**16), victim=st.integers(0, NDISKS - 1))
def test_corrupt_one_disk_everywhere(workdir, area, seed, victim):
    d = workdir()
    arr = create_array(d, NDISKS, DISK_SIZE)
    ref = bytearray(arr.nblocks * 4096)
    try:
        random_writes(arr, ref, random.Random(seed), 40)
        arr.close()
        hits = corrupt(disk_path(d, victim), count=300, seed=seed, area=area)
        assert hits
        arr = open_array(d)
        assert_same(arr, ref)
        st_ = arr.status()
        if area in ("data", "parity"):
            assert st_["disks"][victim]["cksum_errors"] > 0 or area == "parity"
        # repairs were written back: another disk may now die
        found = arr.scrub()
        assert found["unrecoverable"] == 0
        assert found["parity_mismatches"] == 0
        if area == "parity":
            assert arr.disks[victim].cksum_errors >= len(hits)
        if arr.health() == "degraded":  # both superblock copies hit: rebuild it
            arr.rebuild(victim)
        other = (victim + 1 + seed % (NDISKS - 1)) % NDISKS
        arr.fail_disk(other)
        assert_same(arr, ref)
    finally:
        arr.close()
    shutil.rmtree(d)


@SETTINGS
@given(entry=st.integers(0, 991), a=st.integers(0, NDISKS - 1), delta=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_two_damaged_disks_in_one_stripe(workdir, entry, a, delta, seed):
    """Same stripe damaged on two disks: those blocks raise BlockIOError, all others read
    right, never wrong bytes; overwriting the block heals it."""
    d = workdir()
    arr = create_array(d, NDISKS, DISK_SIZE)
    ref = bytearray(arr.nblocks * 4096)
    try:
        random_writes(arr, ref, random.Random(seed), 40)
        g = arr.geo
        b = (a + delta) % NDISKS
        arr.close()
        for k in (a, b):
            with open(disk_path(d, k), "r+b") as f:
                f.seek((g.data_start + entry) * 4096 + 100)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x5A]))
        arr = open_array(d)
        row, off = divmod(entry, g.cb)
        victims = {g.lblock(row, g.role(row, k), off) for k in (a, b) if g.role(row, k) >= 0}
        for lb in range(arr.nblocks):
            if lb in victims:
                with pytest.raises(BlockIOError) as exc:
                    arr.read_sync(lb, 1)
                assert exc.value.block == lb
            else:
                assert arr.read_sync(lb, 1) == bytes(ref[lb * 4096:(lb + 1) * 4096]), lb
        found = arr.scrub()
        assert found["unrecoverable"] >= 1
        # a write to another block of that stripe keeps the damaged ones failing
        others = [k for k in range(NDISKS) if k not in (a, b) and g.role(row, k) >= 0]
        for k in others:
            lb = g.lblock(row, g.role(row, k), off)
            arr.write_sync({lb: b"o" * 4096})
            ref[lb * 4096:(lb + 1) * 4096] = b"o" * 4096
            assert arr.read_sync(lb, 1) == b"o" * 4096
        for lb in victims:
            with pytest.raises(BlockIOError):
                arr.read_sync(lb, 1)
        for lb in victims:  # a full overwrite heals the block
            arr.write_sync({lb: b"x" * 4096})
            ref[lb * 4096:(lb + 1) * 4096] = b"x" * 4096
        for lb in victims:
            assert arr.read_sync(lb, 1) == b"x" * 4096
    finally:
        arr.close()
    shutil.rmtree(d)


def test_scrub_finds_and_rewrites_inconsistent_parity(workdir):
    """A parity block that verifies against its checksum but disagrees with the data (as
    a write hole leaves it) is found by scrub and recomputed."""
    d = workdir()
    arr = create_array(d, NDISKS, DISK_SIZE)
    ref = bytearray(arr.nblocks * 4096)
    try:
        random_writes(arr, ref, random.Random(2), 30)
        g = arr.geo
        for row in (3, 17):
            pd = g.parity_disk(row)
            arr._write_seg(pd, row * g.cb + 5, b"\x01" * 4096)  # stale parity, valid crc
        found = arr.scrub()
        assert found["parity_mismatches"] == 2 and found["parity_repaired"] == 2
        assert arr.scrub()["parity_mismatches"] == 0
        for k in range(NDISKS):  # every member can now be lost
            arr.fail_disk(k)
            assert_same(arr, ref)
            arr.rebuild(k)
    finally:
        arr.close()
