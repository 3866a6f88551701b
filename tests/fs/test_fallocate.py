"""fallocate(2) in the filesystem state machine, called in process (no FUSE): the four
modes, a range of many transactions, ENOSPC before anything is taken, fsck clean; and
fallocate(1) on a real local mount (pyfuse3 with the fallocate handler)."""

import errno
import os

import pytest

from fallocatehelp import check_fallocate_modes
from mounthelp import mounted_array
from replfs.fs.data import (FALLOC_CHUNK, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                            FALLOC_FL_ZERO_RANGE)
from replfs.fs.errors import FsError
from replfs.fs.fsck import fsck
from replfs.fs.layout import BLOCK_SIZE

pytestmark = pytest.mark.timeout(120)

ROOT = 1
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


async def fallocate(fs, ino, mode, offset, length):
    """As the FUSE adapter calls it: one call per chunk, the first reserving."""
    end = offset + length
    done = await fs.fallocate(ino, mode, offset, length)
    calls = 1
    while done < end:
        done = await fs.fallocate(ino, mode, done, end - done, reserve=False)
        calls += 1
    return calls


async def clean(fs):
    rep = await fsck(fs)
    assert rep.clean, rep.problems


async def test_mode_0_allocates_zeros_and_extends(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    free = (await fs.statfs())["bfree"]
    calls = await fallocate(fs, f.ino, 0, 100, 3 * FALLOC_CHUNK * BLOCK_SIZE)
    assert calls == 4            # 3 chunks and 100 bytes: 769 blocks
    a = await fs.getattr(f.ino)
    assert a.size == 100 + 3 * FALLOC_CHUNK * BLOCK_SIZE
    # every block of the range is there, and reads as zeros
    assert free - (await fs.statfs())["bfree"] >= 3 * FALLOC_CHUNK + 1
    assert await fs.read(f.ino, 0, a.size) == bytes(a.size)
    # writes into the range take no more blocks
    free = (await fs.statfs())["bfree"]
    await fs.write(f.ino, 5000, b"x" * 300000)
    assert (await fs.statfs())["bfree"] == free
    await clean(fs)


async def test_keep_size_allocates_past_the_end(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"abc")
    free = (await fs.statfs())["bfree"]
    await fallocate(fs, f.ino, FALLOC_FL_KEEP_SIZE, 0, 40 * BLOCK_SIZE)
    assert (await fs.getattr(f.ino)).size == 3
    assert free - (await fs.statfs())["bfree"] >= 39
    assert await fs.read(f.ino, 0, 100) == b"abc"
    # the blocks past the end are zeros when the file grows over them, and go at truncate
    await fs.setattr(f.ino, size=20 * BLOCK_SIZE)
    assert await fs.read(f.ino, 3, 20 * BLOCK_SIZE) == bytes(20 * BLOCK_SIZE - 3)
    await clean(fs)
    await fs.setattr(f.ino, size=0)
    assert (await fs.statfs())["bfree"] == free + 1
    await clean(fs)


async def test_punch_hole_frees_whole_blocks_and_zeroes_edges(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    data = os.urandom(2000 * BLOCK_SIZE)          # a leaf indirect block and more
    await fs.write(f.ino, 0, data)
    free = (await fs.statfs())["bfree"]
    start, length = 3 * BLOCK_SIZE + 10, 1500 * BLOCK_SIZE
    await fallocate(fs, f.ino, PUNCH, start, length)
    assert (await fs.getattr(f.ino)).size == len(data)
    want = data[:start] + bytes(length) + data[start + length:]
    assert await fs.read(f.ino, 0, len(data)) == want
    assert (await fs.statfs())["bfree"] - free == 1499     # the whole blocks inside
    # inside one block, and past the end: only zeros, no size change
    await fallocate(fs, f.ino, PUNCH, 10, 20)
    await fallocate(fs, f.ino, PUNCH, len(data) - 5, 10 * BLOCK_SIZE)
    want = want[:10] + bytes(20) + want[30:len(data) - 5] + bytes(5)
    assert await fs.read(f.ino, 0, len(data) + 100) == want
    await clean(fs)


async def test_zero_range_zeroes_and_allocates(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    data = os.urandom(10 * BLOCK_SIZE)
    await fs.write(f.ino, 0, data[:4 * BLOCK_SIZE])
    await fs.write(f.ino, 8 * BLOCK_SIZE, data[8 * BLOCK_SIZE:])    # blocks 4-7: a hole
    free = (await fs.statfs())["bfree"]
    await fallocate(fs, f.ino, FALLOC_FL_ZERO_RANGE, 100, 9 * BLOCK_SIZE)
    assert await fs.read(f.ino, 0, len(data)) == (
        data[:100] + bytes(9 * BLOCK_SIZE) + data[100 + 9 * BLOCK_SIZE:])
    assert free - (await fs.statfs())["bfree"] == 4         # the hole got its blocks
    # past the end: the size follows, unless KEEP_SIZE
    await fallocate(fs, f.ino, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                    len(data), BLOCK_SIZE)
    assert (await fs.getattr(f.ino)).size == len(data)
    await fallocate(fs, f.ino, FALLOC_FL_ZERO_RANGE, len(data), 7)
    assert (await fs.getattr(f.ino)).size == len(data) + 7
    await clean(fs)


async def test_zero_range_of_many_written_blocks_fits_a_small_log(fs):
    """Zeroing blocks a file has logs their old bytes: a long range is cut so that no
    transaction outgrows the log (this one holds 2 MiB; the range is 2.4 MiB)."""
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    size = 600 * BLOCK_SIZE
    for off in range(0, size, 128 * 1024):
        await fs.write(f.ino, off, os.urandom(128 * 1024))
    await fallocate(fs, f.ino, FALLOC_FL_ZERO_RANGE, 0, size)
    assert await fs.read(f.ino, 0, size) == bytes(size)
    await clean(fs)


async def test_enospc_up_front_takes_nothing(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    await fs.write(f.ino, 0, b"y" * 5)
    before = await fs.getattr(f.ino)
    free = (await fs.statfs())["bfree"]
    too_many = (free + 10) * BLOCK_SIZE
    for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
        with pytest.raises(FsError) as exc:
            await fs.fallocate(f.ino, mode, 0, too_many)
        assert exc.value.errno == errno.ENOSPC
    assert (await fs.statfs())["bfree"] == free
    after = await fs.getattr(f.ino)
    assert (after.size, after.blocks) == (before.size, before.blocks)
    # what fits is taken whole, and then the space is really there
    size = (free - 20) * BLOCK_SIZE
    await fallocate(fs, f.ino, 0, 0, size)
    left = (await fs.statfs())["bfree"]
    for off in range(0, size, 97 * BLOCK_SIZE):
        await fs.write(f.ino, off, b"z" * (17 * BLOCK_SIZE))
    assert (await fs.statfs())["bfree"] == left
    await clean(fs)


@pytest.mark.parametrize("mode, offset, length, code", [
    (0x08, 0, 10, errno.EOPNOTSUPP),            # COLLAPSE_RANGE
    (0x20, 0, 10, errno.EOPNOTSUPP),            # INSERT_RANGE
    (FALLOC_FL_PUNCH_HOLE, 0, 10, errno.EOPNOTSUPP),      # without KEEP_SIZE
    (PUNCH | FALLOC_FL_ZERO_RANGE, 0, 10, errno.EINVAL),
    (0, -1, 10, errno.EINVAL),
    (0, 0, 0, errno.EINVAL),
    (0, 2**60, 10, errno.EFBIG),
])
async def test_bad_requests(fs, mode, offset, length, code):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    with pytest.raises(FsError) as exc:
        await fs.fallocate(f.ino, mode, offset, length)
    assert exc.value.errno == code


async def test_not_a_regular_file(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    with pytest.raises(FsError) as exc:
        await fs.fallocate(d.ino, 0, 0, 10)
    assert exc.value.errno == errno.EISDIR


def test_fallocate_on_a_local_mount(tmp_path):
    with mounted_array(tmp_path, 4, "32M") as m:
        check_fallocate_modes(m.mnt / "falloc")
