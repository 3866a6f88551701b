import pytest

from clusterhelp import Running


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "placement(P): directory placement of the `running` cluster (spread, "
        "parent or a group number; default spread)")
    config.addinivalue_line(
        "markers", "history: the `running` cluster's primaries stream their histories to "
        "`running.history_dir` (REPLFS_HISTORY_DIR)")


@pytest.fixture
def running(tmp_path, request, monkeypatch):
    """A protected cluster (two groups of two replicas, every group protected) with its
    FUSE client mounted on tmp_path/mnt. `@pytest.mark.placement("parent")` keeps every
    directory in group 0 (for tests of replication that rename across directories,
    which between groups is two-phase commit's business)."""
    marker = request.node.get_closest_marker("placement")
    history = None
    if request.node.get_closest_marker("history"):
        history = tmp_path / "history"
        history.mkdir()
        monkeypatch.setenv("REPLFS_HISTORY_DIR", str(history))
    r = Running(tmp_path / "cluster", tmp_path / "mnt",
                placement=marker.args[0] if marker else "spread")
    r.history_dir = history
    try:
        r.start()
        yield r
    finally:
        r.stop()
