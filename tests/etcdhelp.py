"""A real etcd cluster for tests: `etcd_cluster(tmp, 3)` is tools/etcdlocal.py's (three
etcd members on 127.0.0.1, stopped when the block ends, even when a test fails), but
skips the test where Debian's etcd-server is not installed (tools/bootstrap.sh
installs it)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from replfs.tools import etcdlocal


@contextlib.contextmanager
def etcd_cluster(tmp: Path, members: int = 3):
    if etcdlocal.etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian's etcd-server; tools/bootstrap.sh "
                    "installs it)")
    with etcdlocal.etcd_cluster(tmp, members) as e:
        yield e
