"""Superblocks and member identity: damaged copies, foreign, misplaced, stale and
missing disks are detected and named, never silently used."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from replfs.raid import RaidError, create_array, open_array
from replfs.raid import superblock as sbmod

from .conftest import DISK_SIZE, NDISKS, assert_same, disk_path, random_writes

pytestmark = pytest.mark.timeout(120)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("copy", ["A", "B"])
def test_one_damaged_superblock_copy_is_detected_and_rewritten(new_array, copy):
    arr, ref = new_array
    d, blocks = arr.dir, arr.geo.disk_blocks
    arr.close()
    path = disk_path(d, 1)
    _flip(path, 30 if copy == "A" else (blocks - 1) * 4096 + 30)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = sbmod.read_both(fd)
        assert got.sb is not None and got.damaged == [copy]
    finally:
        os.close(fd)
    arr2 = open_array(d)
    try:
        assert arr2.health() == "healthy"
        assert any(f"superblock copy {copy}" in n for n in arr2.notices)
        assert_same(arr2, ref)
    finally:
        arr2.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sbmod.read_both(fd).damaged == []  # both copies good again
    finally:
        os.close(fd)


def test_both_copies_damaged_means_that_disk_is_unusable(new_array):
    arr, ref = new_array
    d, blocks = arr.dir, arr.geo.disk_blocks
    arr.close()
    _flip(disk_path(d, 2), 30)
    _flip(disk_path(d, 2), (blocks - 1) * 4096 + 30)
    arr2 = open_array(d)
    try:
        assert arr2.health() == "degraded"
        assert arr2.disks[2].state == "failed"
        assert "no valid superblock" in arr2.disks[2].problem
        assert_same(arr2, ref)
        arr2.rebuild(2)
        assert_same(arr2, ref)
    finally:
        arr2.close()


def test_foreign_disk_is_named_and_not_used(tmp_path, new_array):
    arr, ref = new_array
    d = arr.dir
    arr.close()
    other = create_array(str(tmp_path / "other"), NDISKS, DISK_SIZE)
    other.write_sync({0: b"z" * 4096})
    other.close()
    shutil.copy(str(tmp_path / "other" / "disk1.img"), disk_path(d, 1))
    arr2 = open_array(d)
    try:
        assert arr2.disks[1].state == "failed"
        assert "another array" in arr2.disks[1].problem
        assert any("another array" in n for n in arr2.notices)
        assert_same(arr2, ref)
    finally:
        arr2.close()


def test_wrong_order_is_named(new_array):
    arr, ref = new_array
    d = arr.dir
    arr.close()
    cfgp = os.path.join(d, "array.json")
    cfg = json.load(open(cfgp))
    cfg["disks"][0], cfg["disks"][2] = cfg["disks"][2], cfg["disks"][0]
    json.dump(cfg, open(cfgp, "w"))
    with pytest.raises(RaidError) as exc:
        open_array(d)
    msg = str(exc.value)
    assert "wrong order" in msg and "disk 0" in msg and "disk 2" in msg
    # nothing was changed: putting the order back gives the data back
    cfg["disks"][0], cfg["disks"][2] = cfg["disks"][2], cfg["disks"][0]
    json.dump(cfg, open(cfgp, "w"))
    arr2 = open_array(d)
    try:
        assert_same(arr2, ref)
    finally:
        arr2.close()


def test_stale_disk_is_named_and_not_used(tmp_path, new_array):
    arr, ref = new_array
    d = arr.dir
    arr.close()
    saved = str(tmp_path / "old-disk3.img")
    shutil.copy(disk_path(d, 3), saved)
    arr = open_array(d)
    arr.fail_disk(3)
    random_writes(arr, ref, random.Random(5), 30)  # the array goes on without disk 3
    arr.close()
    shutil.copy(saved, disk_path(d, 3))  # the old disk comes back
    arr = open_array(d)
    try:
        assert arr.disks[3].state == "failed"
        assert "stale" in arr.disks[3].problem
        assert_same(arr, ref)  # never the stale contents
        arr.rebuild(3)
        assert_same(arr, ref)
        arr.fail_disk(0)
        assert_same(arr, ref)
    finally:
        arr.close()


def test_old_copy_with_lower_event_counter_is_stale(tmp_path, new_array):
    arr, ref = new_array
    d = arr.dir
    arr.close()
    saved = str(tmp_path / "old.img")
    shutil.copy(disk_path(d, 0), saved)
    for _ in range(3):  # several open/close cycles bump the event counter
        arr = open_array(d)
        random_writes(arr, ref, random.Random(_), 5)
        arr.close()
    shutil.copy(saved, disk_path(d, 0))
    arr = open_array(d)
    try:
        assert "stale" in arr.disks[0].problem
        assert_same(arr, ref)
    finally:
        arr.close()


def test_two_missing_disks_refuse_to_start_naming_both(new_array):
    arr, ref = new_array
    d = arr.dir
    arr.close()
    os.remove(disk_path(d, 0))
    os.remove(disk_path(d, 3))
    with pytest.raises(RaidError) as exc:
        open_array(d)
    msg = str(exc.value)
    assert "2 of 4 disks" in msg and "disk 0" in msg and "disk 3" in msg
    assert "image not found" in msg


def test_array_in_use_is_refused(new_array):
    arr, _ = new_array
    with pytest.raises(RaidError, match="in use"):
        open_array(arr.dir)


def test_counters_persist_across_processes(new_array):
    arr, ref = new_array
    d = arr.dir
    arr.close()
    from replfs.tools.fault import corrupt
    hits = corrupt(disk_path(d, 2), count=50, seed=1, area="data", mode="flip")
    arr = open_array(d)
    assert_same(arr, ref)
    repaired = arr.disks[2].cksum_errors
    assert repaired == len(hits)
    arr.close()
    from replfs.raid import inspect_array
    st = inspect_array(d)
    assert st["disks"][2]["cksum_errors"] == repaired
    arr = open_array(d)
    try:
        assert arr.status()["disks"][2]["cksum_errors"] == repaired
        assert_same(arr, ref)  # repaired on disk: nothing more to fix
        assert arr.disks[2].cksum_errors == repaired
    finally:
        arr.close()


def test_truncated_image_is_named_and_not_used(new_array):
    arr, ref = new_array
    d = arr.dir
    arr.close()
    os.truncate(disk_path(d, 1), 1 << 20)
    arr = open_array(d)
    try:
        assert arr.disks[1].state == "failed" and "truncated" in arr.disks[1].problem
        assert_same(arr, ref)
        arr.rebuild(1)  # the image is grown back to size and refilled
        arr.fail_disk(3)
        assert_same(arr, ref)
    finally:
        arr.close()


def test_log_tail_rewrites_use_what_the_array_wrote_and_keep_parity_right(new_array):
    """Rewriting one block again and again (the log's tail) takes the old data and parity
    from what the array itself wrote (no reads); parity stays right: a scrub is clean,
    and every block reads back with any one disk failed."""
    import random as _random
    arr, ref = new_array
    rng = _random.Random(5)
    for blk in (100, 101, 100, 140, 100):      # the same rows over and over
        for _ in range(20):
            data = rng.randbytes(4096)
            arr.write_sync({blk: data})
            ref[blk * 4096:(blk + 1) * 4096] = data
    assert arr.stats["recent_hits"] > 0
    res = arr.scrub()
    assert not any(res[k] for k in ("parity_mismatches", "parity_repaired",
                                     "cksum_repaired", "unrecoverable")), res
    arr.flush_sync()
    arr.fail_disk(1)
    got = arr.read_sync(0, arr.nblocks)
    assert got == bytes(ref)
