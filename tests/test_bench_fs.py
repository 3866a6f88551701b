"""`replfs bench fs` end to end, tiny: the three mounts (passthrough, local, a replicated
cluster of two groups) come up, every figure is there, the same-group and cross-group
renames ran on the replicated mount, and nothing is left mounted or behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from replfs.replication.config import place_by_name
from replfs.tools.bench_fs import CROSS, CROSS_RATIO, LOCAL, PT, REPL, SAME, pick_dir_names


def test_dir_names_land_in_groups_0_0_1():
    for r in range(5):
        a, b, c = pick_dir_names(r)
        assert len({a, b, c}) == 3
        assert [place_by_name(n.encode(), 2) for n in (a, b, c)] == [0, 0, 1]


@pytest.mark.timeout(60)
def test_bench_fs_tiny_run(tmp_path):
    p = subprocess.run([sys.executable, "-m", "replfs.tools.cli", "bench", "fs", "--size", "2M",
                        "--files", "20", "--replicated-files", "6", "--rounds", "1", "--json",
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=55)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout[p.stdout.index("\n{") + 1:])
    assert doc["errors"] == {}
    med = doc["median"]
    assert set(med) == {PT, LOCAL, REPL}
    assert SAME in med[REPL] and CROSS in med[REPL] and SAME not in med[LOCAL]
    assert any(row["workload"] == CROSS_RATIO for row in doc["table"])
    assert list(tmp_path.iterdir()) == []          # scratch directory removed
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
