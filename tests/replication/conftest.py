import pytest

from clusterhelp import Running


@pytest.fixture
def running(tmp_path):
    """A protected two-replica cluster with its FUSE client mounted on tmp_path/mnt."""
    r = Running(tmp_path / "cluster", tmp_path / "mnt")
    try:
        r.start()
        yield r
    finally:
        r.stop()
