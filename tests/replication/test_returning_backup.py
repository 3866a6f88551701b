"""A backup that comes back after a short absence gets only what changed, is brought up
to date, and then takes over correctly when the primary dies."""

import signal

import pytest

from clusterhelp import compare_replicas, followers

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def server_stats(running, name):
    return running.cluster.status()["servers"][name]["stats"]


def test_returning_backup_gets_only_changes_then_takes_over(running):
    primary = running.primary()
    backup = running.view()["backup"]
    full_before = server_stats(running, primary)["transfers_full"]
    running.sh("mkdir a; for i in $(seq 1 40); do echo $i > a/f$i; done")
    running.cluster.signal(backup, signal.SIGKILL)
    # the primary goes on alone while the backup is away
    running.sh("for i in $(seq 1 40); do echo more$i >> a/f$i; done; echo x > a/new")
    running.cluster.wait_until(lambda st: st["viewserver"]["groups"]["0"]["unprotected"],
                               timeout=30, what="the view without the dead backup")
    running.sh("for i in $(seq 41 60); do echo $i > a/f$i; done")
    running.cluster.start_server(backup)
    st = running.cluster.wait_protected(timeout=60)
    stats = st["servers"][primary]["stats"]
    assert stats["transfers_full"] == full_before       # no second full transfer
    assert stats["transfers_dirty"] >= 1
    assert running.primary() == primary
    # now the primary dies: the returned backup takes over with everything
    running.cluster.signal(primary, signal.SIGKILL)
    running.cluster.wait_primary(not_=primary, timeout=30)
    assert running.primary() == backup
    for i in range(1, 41):
        assert (running.mnt / f"a/f{i}").read_text() == f"{i}\nmore{i}\n"
    for i in range(41, 61):
        assert (running.mnt / f"a/f{i}").read_text() == f"{i}\n"
    assert (running.mnt / "a/new").read_text() == "x\n"
    running.sh("echo after-takeover > a/last")
    running.cluster.start_server(primary)
    running.cluster.wait_protected(timeout=60)
    running.unmount()
    running.cluster.stop_all()
    diff, compared = compare_replicas(running.cfg)
    assert compared > 500 and diff == {s: [] for s in followers(running.cfg)}
