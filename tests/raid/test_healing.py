"""raid/healing.py: a block the inner device cannot read is asked of `heal`,
written back, and counted; without a copy the caller gets BlockIOError."""

import trio

from replfs.raid import BlockIOError, MemoryDevice
from replfs.raid.healing import HealingDevice


class Flaky(MemoryDevice):
    def __init__(self, n):
        super().__init__(n)
        self.bad = set()

    async def read_blocks(self, start, count):
        for b in range(start, start + count):
            if b in self.bad:
                raise BlockIOError(b, "damaged")
        return await super().read_blocks(start, count)

    async def write_blocks(self, blocks):
        self.bad -= set(blocks)
        await super().write_blocks(blocks)


def test_heal_rewrites_and_counts():
    async def go():
        inner = Flaky(8)
        await inner.write_blocks({b: bytes([b]) * 4096 for b in range(8)})
        inner.bad = {2, 5}
        asked = []

        async def heal(b):
            asked.append(b)
            return bytes([b]) * 4096 if b == 2 else None
        dev = HealingDevice(inner, heal)
        assert await dev.read_blocks(0, 3) == b"".join(bytes([b]) * 4096 for b in range(3))
        assert dev.healed == 1 and 2 not in inner.bad
        assert await dev.read_block(2) == bytes([2]) * 4096 and asked == [2]
        try:
            await dev.read_blocks(4, 2)
            raise AssertionError("no error")
        except BlockIOError as exc:
            assert exc.block == 5
        assert dev.unhealed == 1 and dev.lost == [5]
        await dev.write_blocks({5: bytes(4096)})
        assert dev.lost == [] and await dev.read_block(5) == bytes(4096)
    trio.run(go)
