"""`replfs bench fs` end to end, tiny: the three mounts (passthrough, local, a replicated
cluster of two groups) come up, every figure is there, the same-group and cross-group
renames ran on the replicated mount, and nothing is left mounted or behind; and the
table's goals (the replicated mount against the passthrough) from given figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from replfs.replication.config import place_by_name
from replfs.tools.bench_fs import (CREATE, CROSS, CROSS_RATIO, FSYNC, GOALS, LOCAL, PT, REPL,
                                   SAME, SEQ_R, SEQ_RR, pick_dir_names, per_round_figures,
                                   summarise)


def test_dir_names_land_in_groups_0_0_1():
    for r in range(5):
        a, b, c = pick_dir_names(r)
        assert len({a, b, c}) == 3
        assert [place_by_name(n.encode(), 2) for n in (a, b, c)] == [0, 0, 1]


def test_goals_say_ok_or_by_how_much_they_are_missed():
    medians = {PT: {CREATE: 1000.0, SEQ_R: 100.0, FSYNC: 0.5},
               LOCAL: {CREATE: 500.0, SEQ_R: 80.0, FSYNC: 1.5},
               REPL: {CREATE: 120.0, SEQ_R: 150.0, FSYNC: 2.5, CROSS_RATIO: 0.25}}
    rows = {r["workload"]: r for r in summarise(medians)["rows"]}
    assert rows[CREATE]["replicated/passthrough"] == pytest.approx(0.12)
    assert rows[CREATE]["local/passthrough"] == pytest.approx(0.5)
    assert (rows[CREATE]["met"], rows[CREATE]["verdict"]) == (False, "MISS 0.12x of 0.4x")
    assert (rows[SEQ_R]["met"], rows[SEQ_R]["verdict"]) == (True, "ok")
    assert rows[FSYNC]["replicated/passthrough"] == pytest.approx(0.2)     # latency: den/num
    assert rows[FSYNC]["verdict"] == "MISS 2.50 ms of <= 1 ms"
    assert rows[CROSS_RATIO]["verdict"] == "MISS 0.25x of 0.3x"


def test_ratios_pair_the_rounds():
    # the passthrough's first round and the replicated mount's second were slowed down
    # (a noisy neighbour): the rounds' ratios are 5, 0.5 and 5, the medians' 0.5
    seq = {PT: [{SEQ_R: 10.0}, {SEQ_R: 100.0}, {SEQ_R: 100.0}],
           REPL: [{SEQ_R: 50.0}, {SEQ_R: 50.0}, {SEQ_R: 500.0}]}
    medians = {PT: {SEQ_R: 100.0}, REPL: {SEQ_R: 50.0}}
    rows = {r["workload"]: r for r in summarise(medians, per_round_figures(seq))["rows"]}
    assert rows[SEQ_R]["replicated/passthrough"] == pytest.approx(5.0)
    rows = {r["workload"]: r for r in summarise(medians)["rows"]}
    assert rows[SEQ_R]["replicated/passthrough"] == pytest.approx(0.5)


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
    assert all(SEQ_RR in med[m] for m in (PT, LOCAL, REPL))
    for row in doc["table"]:
        if row["workload"] in GOALS:
            assert row["replicated/passthrough"] > 0
            assert row["verdict"] == "ok" or row["verdict"].startswith("MISS ")
    assert any(row["workload"] == CROSS_RATIO for row in doc["table"])
    assert list(tmp_path.iterdir()) == []          # scratch directory removed
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
