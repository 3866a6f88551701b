"""fsync returns only when both replicas hold the data on stable storage: right after
fsync returns, the backup is killed (-9) and its own array, opened offline, has it."""

import os
import signal

import pytest
import trio

from replfs.fs.mkfs import open_fs
from replfs.raid import open_array

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def read_offline(server_dir: str, name: bytes) -> bytes:
    async def go():
        array = open_array(server_dir)
        try:
            fs = await open_fs(array, reclaim=False)
            try:
                attr = await fs.lookup(fs.root_ino, name)
                return await fs.read(attr.ino, 0, attr.size)
            finally:
                await fs.close()
        finally:
            array.close()
    return trio.run(go)


def test_fsynced_data_is_on_the_backup(running):
    backup = running.view()["backup"]
    data = os.urandom(3 * 2**20 + 123)
    fd = os.open(running.mnt / "durable", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        running.cluster.signal(backup, signal.SIGKILL)      # at once: nothing more arrives
    finally:
        os.close(fd)
    running.unmount()
    running.cluster.stop_all()
    assert read_offline(running.cfg.server_dir(backup), b"durable") == data
