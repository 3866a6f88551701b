"""The write hole: a process killed between a data write and its parity write, then a
lost disk, must not turn into wrong bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from replfs.crash import CRASH_EXIT_CODE
from replfs.raid import BlockIOError, RaidError, WriteHole, create_array, open_array

from .conftest import DISK_SIZE, NDISKS, disk_path

pytestmark = pytest.mark.timeout(120)

CHILD = r"""
import sys
from replfs.raid import open_array
arr = open_array(sys.argv[1])
target = int(sys.argv[2])
arr.write_sync({target: b"N" * 4096})      # partial stripe: RMW, crash before parity
arr.flush_sync()
arr.close()
print("not crashed")
"""


def _fill(d):
    arr = create_array(d, NDISKS, DISK_SIZE)
    old = {lb: bytes([lb % 251]) * 4096 for lb in range(arr.nblocks)}
    for s in range(0, arr.nblocks, 512):
        arr.write_sync({lb: old[lb] for lb in range(s, min(arr.nblocks, s + 512))})
    geo = arr.geo
    arr.close()
    return old, geo


def _crash_child(d, target):
    env = dict(os.environ, REPLFS_CRASH_AT="raid.between_data_and_parity")
    p = subprocess.run([sys.executable, "-c", CHILD, d, str(target)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == CRASH_EXIT_CODE, p.stdout + p.stderr
    assert "crash point raid.between_data_and_parity" in p.stderr


def _stripe_parity_ok(d, geo, entry) -> bool:
    acc = np.zeros(4096, dtype=np.uint8)
    for k in range(NDISKS):
        with open(disk_path(d, k), "rb") as f:
            f.seek((geo.data_start + entry) * 4096)
            acc ^= np.frombuffer(f.read(4096), dtype=np.uint8)
    return not acc.any()


def test_crash_between_data_and_parity_then_lose_a_disk(tmp_path):
    d = str(tmp_path / "arr")
    old, geo = _fill(d)
    target = geo.lblock(5, 1, 3)  # row 5, data chunk 1, offset 3
    _crash_child(d, target)
    entry = 5 * geo.cb + 3
    # the hole is real: data landed, parity did not
    assert not _stripe_parity_ok(d, geo, entry)
    arr = open_array(d)  # unclean stop: the bitmap's rows are resynchronised
    try:
        assert arr.stats["resynced_rows"] > 0
        assert any("resynchronised" in n for n in arr.notices)
        assert _stripe_parity_ok(d, geo, entry)
        # now lose a disk holding *another* block of that stripe
        victim = geo.data_disk(5, 0)
        arr.fail_disk(victim)
        for lb in range(arr.nblocks):
            got = arr.read_sync(lb, 1)
            if lb == target:
                assert got in (old[lb], b"N" * 4096)  # unflushed write: old or new
            else:
                assert got == old[lb], lb
    finally:
        arr.close()


def _crashed_then_disk_lost(tmp_path):
    """A filled array killed between a data and its parity write in row 5, and the disk
    of another block of that stripe gone before the restart: (dir, the blocks' old
    contents, geometry, the block written, the disk removed)."""
    d = str(tmp_path / "arr")
    old, geo = _fill(d)
    target = geo.lblock(5, 1, 3)
    _crash_child(d, target)
    victim = geo.data_disk(5, 0)
    os.remove(disk_path(d, victim))
    return d, old, geo, target, victim


def test_crash_then_disk_lost_before_restart_never_wrong_bytes(tmp_path):
    d, old, geo, target, victim = _crashed_then_disk_lost(tmp_path)
    with pytest.raises(RaidError, match="not shut down cleanly") as exc:
        open_array(d)
    assert f"disk {victim}" in str(exc.value)
    arr = open_array(d, force=True)
    try:
        for lb in range(arr.nblocks):
            row, role, off = geo.locate(lb)
            try:
                got = arr.read_sync(lb, 1)
            except BlockIOError:
                assert geo.data_disk(row, role) == victim  # only the lost disk's blocks
                continue
            if lb == target:
                assert got in (old[lb], b"N" * 4096)
            else:
                assert got == old[lb], lb
        with pytest.raises(RaidError, match="cannot rebuild"):
            arr.rebuild(victim)
    finally:
        arr.close()


def test_crash_during_random_workload_keeps_flushed_data(tmp_path):
    """Flushed writes survive a crash in the middle of later batches; scrub then finds a
    consistent array."""
    d = str(tmp_path / "arr")
    arr = create_array(d, NDISKS, DISK_SIZE)
    arr.close()
    child = r"""
import random, sys
from replfs.raid import open_array
arr = open_array(sys.argv[1])
rng = random.Random(7)
flushed = {}
for i in range(200):
    s = rng.randrange(arr.nblocks - 40)
    batch = {s + j: bytes([i % 250 + 1]) * 4096 for j in range(rng.randint(1, 40))}
    arr.write_sync(batch)
    if i == 99:
        arr.flush_sync()
        print("FLUSHED", flush=True)
"""
    env = dict(os.environ, REPLFS_CRASH_AT="raid.between_data_and_parity:150")
    p = subprocess.run([sys.executable, "-c", child, d], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == CRASH_EXIT_CODE and "FLUSHED" in p.stdout, p.stderr
    # replay the deterministic workload: a block may read as its last flushed value or
    # as any value written after that flush, nothing else
    import random
    rng = random.Random(7)
    allowed: dict[int, set[bytes]] = {}
    for i in range(200):
        s = rng.randrange(arr.nblocks - 40)
        for j in range(rng.randint(1, 40)):
            v = bytes([i % 250 + 1]) * 4096
            if i <= 99:
                allowed[s + j] = {v}
            else:
                allowed.setdefault(s + j, {bytes(4096)}).add(v)
    arr = open_array(d)
    try:
        found = arr.scrub()
        assert found["parity_mismatches"] == 0 and found["unrecoverable"] == 0
        arr.fail_disk(2)
        for lb in range(arr.nblocks):
            got = arr.read_sync(lb, 1)
            assert got in allowed.get(lb, {bytes(4096)}), lb
    finally:
        arr.close()


def test_a_replica_may_open_with_the_lost_blocks_zeroed(tmp_path):
    """`zero_lost` (for a replica that then takes a full copy from its partner): the
    rows that may have been mid-write get the missing disk's chunk as zeros and a parity
    that matches; nothing else changes, nothing is untrusted, and the disk then rebuilds
    and scrubs clean."""
    d, old, geo, target, victim = _crashed_then_disk_lost(tmp_path)
    with pytest.raises(WriteHole, match="not shut down cleanly"):
        open_array(d)
    arr = open_array(d, zero_lost=True)
    try:
        assert arr.zeroed > 0 and any("now read as zeros" in n for n in arr.notices)
        got = {lb: arr.read_sync(lb, 1) for lb in range(arr.nblocks)}   # all readable
        changed = [lb for lb in got if got[lb] != old[lb] and lb != target]
        assert changed and all(got[lb] == bytes(4096) for lb in changed)
        # whole chunks of the lost disk, in rows of the region that was mid-write
        rows = {geo.locate(lb)[0] for lb in changed}
        lost = [lb for lb in got if geo.locate(lb)[0] in rows
                and geo.data_disk(*geo.locate(lb)[:2]) == victim]
        assert set(changed) <= set(lost) and all(got[lb] == bytes(4096) for lb in lost)
        assert 5 in rows and len(lost) == arr.zeroed == len(rows) * geo.cb
        assert got[target] in (old[target], b"N" * 4096)
        zeroed = lost
        arr.rebuild(victim, image=str(tmp_path / "new.img"))
        found = arr.scrub()
        assert found["parity_mismatches"] == 0 and found["unrecoverable"] == 0
        assert all(arr.read_sync(lb, 1) == bytes(4096) for lb in zeroed)
    finally:
        arr.close()


def test_rows_below_a_rebuilding_disks_position_are_trusted_after_a_crash(tmp_path):
    """A crash mid-write while disk 1 was half rebuilt: its rows below the recorded
    position are whole on every member and are resynchronised as usual; only the rows
    above it, where disk 1 holds data, are the write hole."""
    d = str(tmp_path / "arr")
    old, geo = _fill(d)
    arr = open_array(d)
    arr.fail_disk(1)
    steps = arr.rebuild_steps(1, image=str(tmp_path / "new1.img"), batch_rows=10)
    for _ in range(3):
        next(steps)
    steps.close()                               # stopped at row 30, recorded
    assert arr.disks[1].durable_pos == 30
    arr.close()
    target = geo.lblock(5, 0, 3)
    _crash_child(d, target)                     # the write hole, in row 5
    with pytest.raises(WriteHole):
        open_array(d)
    arr = open_array(d, force=True)
    try:
        for lb in range(arr.nblocks):
            row, role, _ = geo.locate(lb)
            on_1 = geo.data_disk(row, role) == 1
            try:
                got = arr.read_sync(lb, 1)
            except BlockIOError:
                assert on_1 and row >= 30, (lb, row)
                continue
            assert not (on_1 and row >= 30), (lb, row)
            assert got == old[lb] or (lb == target and got == b"N" * 4096), lb
    finally:
        arr.close()
