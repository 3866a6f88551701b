"""Checksums on disk, cached within a bound: an array whose checksum cache holds only a
few pages per member must keep every promise of one that holds them all (damage
repaired, a crash mid-write leaves old-or-new bytes, a lost disk after it), and a
process holding a much larger array must not use more memory than its cache allows."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from replfs.crash import CRASH_EXIT_CODE
from replfs.raid import DEFAULT_CHECKSUM_CACHE, create_array, open_array
from replfs.raid.checksums import MIN_PAGES
from replfs.tools.fault import corrupt

from .conftest import NDISKS, assert_same, disk_path, random_writes

pytestmark = pytest.mark.timeout(180)

SMALL = 24 << 20  # 24 MiB per disk: 6 checksum pages per member, more than MIN_PAGES


def _check_bounded(arr) -> dict:
    c = arr.status()["checksum_cache"]
    assert c["pages"] <= MIN_PAGES * NDISKS, c
    return c


def test_small_cache_survives_damage_while_open_and_at_open(tmp_path):
    d = str(tmp_path / "arr")
    arr = create_array(d, NDISKS, SMALL, checksum_cache=0)   # MIN_PAGES per member
    ref = bytearray(arr.nblocks * 4096)
    try:
        random_writes(arr, ref, random.Random(1), 150)
        assert_same(arr, ref)
        c = _check_bounded(arr)
        assert c["misses"] > c["pages"] and c["writebacks"] > 0, c   # it did evict
        arr.flush_sync()
        # damage checksum blocks and data of one member under the running array: evicted
        # pages are read again, found damaged, and their blocks checked against parity
        victim = 2
        assert corrupt(disk_path(d, victim), count=4, seed=3, area="checksum")
        assert corrupt(disk_path(d, victim), count=40, seed=4, area="data")
        assert_same(arr, ref)
        random_writes(arr, ref, random.Random(2), 60)
        arr.close()
        assert corrupt(disk_path(d, victim), count=3, seed=5, area="checksum")
        arr = open_array(d, checksum_cache=0)
        assert any("checksum blocks were damaged" in n for n in arr.notices), arr.notices
        assert_same(arr, ref)
        found = arr.scrub()
        assert found["unrecoverable"] == 0 and found["parity_mismatches"] == 0, found
        _check_bounded(arr)
        arr.fail_disk((victim + 1) % NDISKS)      # the repairs reached the disk
        assert_same(arr, ref)
        arr.rebuild((victim + 1) % NDISKS)
        arr.fail_disk(victim)
        assert_same(arr, ref)
    finally:
        arr.close()


CRASH_CHILD = r"""
import random, sys
from replfs.raid import open_array
arr = open_array(sys.argv[1], checksum_cache=0)
rng = random.Random(7)
for i in range(400):
    start = rng.randrange(arr.nblocks)
    keys = range(start, min(arr.nblocks, start + rng.randint(1, 40)))
    arr.write_sync({k: bytes([i % 251 + 1]) * 4096 for k in keys})
    if i % 50 == 49:
        arr.flush_sync()
        print(i, flush=True)
arr.close()
"""


def test_small_cache_crash_mid_write_then_lose_a_disk(tmp_path):
    """kill at a crash point between a data write and its parity write while the small
    cache evicts checksum pages: after the resync every block holds what was last
    written before the last flush, or something written after it; then a disk dies
    and every block still reads so."""
    d = str(tmp_path / "arr")
    arr = create_array(d, NDISKS, SMALL, checksum_cache=0)
    nblocks = arr.nblocks
    arr.close()
    env = dict(os.environ, REPLFS_CRASH_AT="raid.between_data_and_parity:300")
    p = subprocess.run([sys.executable, "-c", CRASH_CHILD, d], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == CRASH_EXIT_CODE, p.stdout + p.stderr
    flushed = int(p.stdout.split()[-1]) if p.stdout.strip() else -1
    # what each block may hold: its value at the last flush, or any later one
    rng = random.Random(7)
    allowed = [{bytes(4096)} for _ in range(nblocks)]
    for i in range(400):
        start = rng.randrange(nblocks)
        keys = range(start, min(nblocks, start + rng.randint(1, 40)))
        for k in keys:
            v = bytes([i % 251 + 1]) * 4096
            allowed[k] = {v} if i <= flushed else allowed[k] | {v}
    arr = open_array(d, checksum_cache=0)
    try:
        assert arr.stats["resynced_rows"] > 0
        for lost in (None, 1):
            if lost is not None:
                arr.fail_disk(lost)
            got = arr.read_sync(0, nblocks)
            bad = [k for k in range(nblocks) if got[k * 4096:(k + 1) * 4096] not in allowed[k]]
            assert not bad, f"{len(bad)} blocks hold what was never written there: {bad[:10]}"
        _check_bounded(arr)
    finally:
        arr.close()


MEMORY_CHILD = r"""
import json, random, sys
import psutil
from replfs.raid import create_array, open_array, parse_size
d, size = sys.argv[1], parse_size(sys.argv[2])
create_array(d, 4, size).close()
arr = open_array(d)
rng = random.Random(5)
ref = {}
for i in range(300):      # scattered over the whole array: every write a new page
    start = rng.randrange(arr.nblocks - 8)
    batch = {k: rng.randbytes(4096) for k in range(start, start + 8)}
    arr.write_sync(batch)
    ref.update(batch)
    if i % 50 == 49:
        arr.flush_sync()
for k, v in ref.items():
    assert arr.read_sync(k, 1) == v, k
st = arr.status()
arr.close()
print(json.dumps({"rss": psutil.Process().memory_info().rss, "nblocks": st["nblocks"],
                  "cache": st["checksum_cache"]}))
"""


def _memory_run(d: str, size: str) -> dict:
    p = subprocess.run([sys.executable, "-c", MEMORY_CHILD, d, size], capture_output=True,
                       text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def test_memory_of_a_large_sparse_array_is_set_by_the_cache(tmp_path):
    """4 sparse images of 64 GiB (held whole, their checksums would take 320 MiB) against
    4 of 64 MiB, the same work on each in a fresh process: the large array's process
    is bigger by no more than the checksum cache and some slack."""
    small = _memory_run(str(tmp_path / "small"), "64M")
    big = _memory_run(str(tmp_path / "big"), "64G")
    assert big["nblocks"] > 1000 * small["nblocks"]
    assert big["cache"]["pages"] * 4096 <= DEFAULT_CHECKSUM_CACHE
    assert big["cache"]["misses"] >= 300          # the work did reach all over the disks
    grew = big["rss"] - small["rss"]
    assert grew <= DEFAULT_CHECKSUM_CACHE + (32 << 20), (
        f"the 64 GiB array's process used {grew >> 20} MiB more than the 64 MiB one's")
