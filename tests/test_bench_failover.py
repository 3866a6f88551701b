"""`replfs bench failover` with its view server cases: one real run of the worst of them
(kill -9 of the active view server, then of the primary, on three view servers over a
real three-member etcd started by the bench), whose JSON rows keep their shape; a writer
still hanging when the run ends counts as stalled; and where etcd is missing the case is
a row that says so, not a failure."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from rich.console import Console

from replfs.tools import bench_failover, etcdlocal


def test_a_write_hanging_at_the_end_counts_as_stalled():
    w = bench_failover.Writer("/nonexistent")
    w.times = [10.0, 10.1, 10.2, 10.5]
    assert w.longest_gap(10.0, 10.6) == pytest.approx(0.3)
    assert w.longest_gap(10.0, 12.5) == pytest.approx(2.0)   # nothing returned after 10.5
    assert w.longest_gap(10.15, 10.3) == pytest.approx(0.1)


def test_without_etcd_the_view_server_cases_are_skipped_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(etcdlocal, "etcd_binary", lambda: None)
    row = bench_failover.worst_of(str(tmp_path), "vs", 1, 1.0)
    assert row["fault"] == "vs"
    assert "etcd is not installed" in row["skipped"]
    assert list(tmp_path.iterdir()) == []                    # nothing started, nothing left
    out = io.StringIO()
    bench_failover.print_stalls(Console(file=out, width=300), [row],
                                SimpleNamespace(rounds=1, etcd_election_timeout=500))
    assert "skipped: etcd is not installed" in out.getvalue()


@pytest.mark.soak       # a real run of the benchmark's etcd cases (~20 s); the view service's
@pytest.mark.timeout(240)   # failures themselves are in test_netns.py, every run
def test_view_server_then_primary_killed(tmp_path):
    if etcdlocal.etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian's etcd-server; tools/bootstrap.sh "
                    "installs it)")
    p = subprocess.run([sys.executable, "-m", "replfs.tools.cli", "bench", "failover",
                        "--faults", "vs+kill", "--rounds", "1", "--seconds", "1",
                        "--resync-rounds", "0", "--json", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=230)
    assert p.returncode == 0, p.stdout + p.stderr
    (row,) = json.loads(p.stdout[p.stdout.index("["):])
    assert row["fault"] == "vs+kill" and row["goal"] == 2.0
    assert row["met"] == (row["stall"] <= 2.0)
    assert row["writes"] > 0 and row["rate_before"] > 0
    # no new primary before a standby took over, nor before the primary missed
    # dead_pings pings (0.5 s) counted from the takeover: the writer waited that long
    assert row["stall"] >= row["takeover"] + 0.4
    # the bench stopped its etcd members, view servers, servers and mount
    assert list(tmp_path.iterdir()) == []
    assert str(tmp_path) not in subprocess.run(["ps", "axww", "-o", "args"], text=True,
                                               capture_output=True).stdout
