"""The small block-device interface that everything above raid/ is written against.

txn/ (and through it fs/) sees storage only as a `BlockDevice`: numbered blocks of
`block_size` bytes, read one or several at a time, written in batches, and made durable
by `flush()`. The RAID-5 array implements it; so do `MemoryDevice` (tests, with a
simulated power loss) and `FileDevice` (one plain image file, the benchmarks' baseline).

Contract, for every implementation:
- `read_block(n)` returns exactly `block_size` bytes: what the last `write_blocks` for n
  wrote, or zeros if none ever did. It never returns wrong bytes: when the data cannot be
  read or verified it raises `BlockIOError` naming the block.
- `write_blocks({n: data, ...})` writes whole blocks; the batch is not atomic across a
  crash (some blocks may land, others not), but every block lands whole or not at all.
- `flush()` returns only when every write that returned before it was called is on
  stable storage.
- The methods are async (trio) so that callers interleave while one waits for I/O;
  `flush()` in particular runs the fsync in a worker thread.
- Out-of-range block numbers and wrong-sized buffers raise `ValueError`.
"""

from __future__ import annotations

import os
from typing import Mapping, Protocol, runtime_checkable

import trio

BLOCK_SIZE = 4096


class BlockIOError(OSError):
    """A block could not be read or written correctly (the caller should map it to EIO)."""

    def __init__(self, block: int, reason: str):
        super().__init__(5, f"block {block}: {reason}")
        self.block = block
        self.reason = reason


@runtime_checkable
class BlockDevice(Protocol):
    block_size: int
    nblocks: int

    async def read_block(self, n: int) -> bytes: ...

    async def read_blocks(self, start: int, count: int) -> bytes: ...

    async def write_blocks(self, blocks: Mapping[int, bytes]) -> None: ...

    async def flush(self) -> None: ...


def check_write(dev: BlockDevice, blocks: Mapping[int, bytes]) -> None:
    for n, data in blocks.items():
        if not 0 <= n < dev.nblocks:
            raise ValueError(f"block {n} out of range 0..{dev.nblocks - 1}")
        if len(data) != dev.block_size:
            raise ValueError(f"block {n}: {len(data)} bytes, expected {dev.block_size}")


def check_range(dev: BlockDevice, start: int, count: int) -> None:
    if count < 0 or not (0 <= start and start + count <= dev.nblocks):
        raise ValueError(f"blocks {start}..{start + count - 1} out of range 0..{dev.nblocks - 1}")


class MemoryDevice:
    """A block device in memory, with an explicit model of what is durable.

    Writes go to a volatile layer; `flush()` makes them durable. `crash()` simulates a
    power loss: every write since the last flush is lost (or, with `keep`, a chosen
    subset survives, to model writes that reached the platter in any order).
    """

    def __init__(self, nblocks: int, block_size: int = BLOCK_SIZE):
        self.block_size = block_size
        self.nblocks = nblocks
        self._durable: dict[int, bytes] = {}
        self._volatile: dict[int, bytes] = {}
        self.flushes = 0
        self.writes = 0

    async def read_block(self, n: int) -> bytes:
        check_range(self, n, 1)
        await trio.lowlevel.checkpoint()
        return self._get(n)

    async def read_blocks(self, start: int, count: int) -> bytes:
        check_range(self, start, count)
        await trio.lowlevel.checkpoint()
        return b"".join(self._get(n) for n in range(start, start + count))

    def _get(self, n: int) -> bytes:
        data = self._volatile.get(n)
        if data is None:
            data = self._durable.get(n, bytes(self.block_size))
        return data

    async def write_blocks(self, blocks: Mapping[int, bytes]) -> None:
        check_write(self, blocks)
        await trio.lowlevel.checkpoint()
        for n, data in blocks.items():
            self._volatile[n] = bytes(data)
            self.writes += 1

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self._durable.update(self._volatile)
        self._volatile.clear()
        self.flushes += 1

    def crash(self, keep=None) -> None:
        """Lose unflushed writes; `keep(n) -> bool` picks blocks that survive anyway."""
        if keep is not None:
            for n, data in self._volatile.items():
                if keep(n):
                    self._durable[n] = data
        self._volatile.clear()


class FileDevice:
    """One plain image file as a block device (no redundancy, no checksums)."""

    def __init__(self, path: str | os.PathLike, nblocks: int | None = None,
                 block_size: int = BLOCK_SIZE, create: bool = False):
        self.path = os.fspath(path)
        self.block_size = block_size
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self._fd = os.open(self.path, flags, 0o644)
        if nblocks is None:
            nblocks = os.fstat(self._fd).st_size // block_size
        elif create:
            os.ftruncate(self._fd, nblocks * block_size)
        self.nblocks = nblocks

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def read_block(self, n: int) -> bytes:
        return await self.read_blocks(n, 1)

    async def read_blocks(self, start: int, count: int) -> bytes:
        check_range(self, start, count)
        await trio.lowlevel.checkpoint()
        want = count * self.block_size
        data = os.pread(self._fd, want, start * self.block_size)
        return data + bytes(want - len(data))

    async def write_blocks(self, blocks: Mapping[int, bytes]) -> None:
        check_write(self, blocks)
        await trio.lowlevel.checkpoint()
        for n, data in sorted(blocks.items()):
            os.pwrite(self._fd, data, n * self.block_size)

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self._fd)
