import pytest

from replfs.fs.mkfs import mkfs, open_fs
from replfs.raid.blockdev import MemoryDevice


@pytest.fixture
async def memdev():
    dev = MemoryDevice(8192)
    await mkfs(dev, inodes=8192)
    return dev


@pytest.fixture
async def fs(memdev):
    f = await open_fs(memdev)
    try:
        yield f
    finally:
        await f.close()
