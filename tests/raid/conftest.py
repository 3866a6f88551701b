"""Fixtures and helpers for the RAID tests: small real arrays of image files in tmp_path."""

from __future__ import annotations

import os
import random

import pytest

from replfs.raid import create_array, open_array

DISK_SIZE = 4 << 20  # 4 MiB per disk: 4 disks give 2976 logical blocks
NDISKS = 4


def random_writes(arr, ref: bytearray, rng: random.Random, nops: int, maxlen: int = 40):
    """Random batches of blocks (1..maxlen, sometimes scattered), mirrored into `ref`."""
    for _ in range(nops):
        start = rng.randrange(arr.nblocks)
        if rng.random() < 0.3:
            keys = {rng.randrange(arr.nblocks) for _ in range(rng.randint(1, 8))}
        else:
            keys = range(start, min(arr.nblocks, start + rng.randint(1, maxlen)))
        batch = {k: rng.randbytes(4096) for k in keys}
        arr.write_sync(batch)
        for k, v in batch.items():
            ref[k * 4096:(k + 1) * 4096] = v


def assert_same(arr, ref: bytes):
    got = arr.read_sync(0, arr.nblocks)
    if got != bytes(ref):
        bad = [b for b in range(arr.nblocks)
               if got[b * 4096:(b + 1) * 4096] != ref[b * 4096:(b + 1) * 4096]]
        raise AssertionError(f"{len(bad)} blocks differ, first {bad[:10]}")


@pytest.fixture
def array_dir(tmp_path):
    return str(tmp_path / "arr")


@pytest.fixture
def new_array(array_dir):
    """(array, reference buffer): an open array filled with random data."""
    arr = create_array(array_dir, NDISKS, DISK_SIZE)
    ref = bytearray(arr.nblocks * 4096)
    random_writes(arr, ref, random.Random(0), 60)
    arr.flush_sync()
    yield arr, ref
    arr.close()


def reopen(arr):
    d = arr.dir
    arr.close()
    return open_array(d)


def disk_path(array_dir: str, k: int) -> str:
    return os.path.join(array_dir, f"disk{k}.img")
