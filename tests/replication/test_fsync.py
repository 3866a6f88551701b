"""fsync returns only when both replicas hold the data on stable storage: right after
fsync returns, the backup is killed (-9) and its own array, opened offline, has it."""

import os
import signal

import pytest

from clusterhelp import read_offline

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


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
