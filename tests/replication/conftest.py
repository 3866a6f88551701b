import pytest

from clusterhelp import Running


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "placement(P): directory placement of the `running` cluster (spread, "
        "parent or a group number; default spread)")


@pytest.fixture
def running(tmp_path, request):
    """A protected cluster (two groups of two replicas, every group protected) with its
    FUSE client mounted on tmp_path/mnt. `@pytest.mark.placement("parent")` keeps every
    directory in group 0 (for tests of replication that rename across directories,
    which between groups is two-phase commit's business)."""
    marker = request.node.get_closest_marker("placement")
    r = Running(tmp_path / "cluster", tmp_path / "mnt",
                placement=marker.args[0] if marker else "spread")
    try:
        r.start()
        yield r
    finally:
        r.stop()
