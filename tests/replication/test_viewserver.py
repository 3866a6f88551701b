"""The view-server rules, one test each, on the pure state machine with explicit time."""

import pytest

from replfs.replication.viewserver import View, ViewService

PI = 0.1
DEAD = 5 * PI + 0.05        # just past DeadPings x PingInterval

pytestmark = pytest.mark.timeout(10)


def make():
    return ViewService(ping_interval=PI, dead_pings=5)


def test_first_pinger_becomes_primary_of_view_1():
    vs = make()
    assert vs.ping(0, "a", 0, 0.0) == View(1, "a", "")


def test_next_idle_server_becomes_backup_once_primary_acked():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "b", 0, 0.01)
    assert vs.get(0) == View(1, "a", "")          # view 1 not acknowledged yet
    vs.ping(0, "a", 1, 0.1)
    assert vs.get(0) == View(2, "a", "b")


def test_dead_primary_replaced_by_backup_and_idle_becomes_backup():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    vs.ping(0, "a", 2, 0.1)
    vs.ping(0, "c", 0, 0.1)
    assert vs.get(0) == View(2, "a", "b")
    t = 0.1
    while t < 0.1 + DEAD:            # b and c keep pinging, a is silent
        t += PI
        vs.ping(0, "b", 2, t)
        vs.ping(0, "c", 0, t)
        vs.tick(t)
    assert vs.get(0) == View(3, "b", "c")


def test_dead_primary_without_backup_stays_primary():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.tick(10.0)
    assert vs.get(0) == View(1, "a", "")


def test_restarted_primary_is_treated_as_dead_without_missing_a_ping():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    vs.ping(0, "a", 2, 0.05)
    vs.ping(0, "b", 2, 0.05)
    assert vs.get(0) == View(2, "a", "b")
    assert vs.ping(0, "a", 0, 0.1) == View(3, "b", "")   # restarted: its state is gone
    vs.ping(0, "b", 3, 0.15)
    assert vs.ping(0, "a", 0, 0.2) == View(4, "b", "a")  # back as an idle server -> backup


def test_restarted_backup_is_treated_as_dead():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    vs.ping(0, "a", 2, 0.05)
    vs.ping(0, "b", 0, 0.1)
    assert vs.get(0) == View(3, "a", "")


def test_no_view_change_until_primary_acknowledges_even_if_primary_dies():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    assert vs.get(0) == View(2, "a", "b")        # a has not acknowledged view 2
    t = 0.0
    for _ in range(30):                           # a dies; b keeps pinging
        t += PI
        vs.ping(0, "b", 2, t)
        vs.tick(t)
    assert vs.get(0) == View(2, "a", "b")        # stuck, rightly: b may not hold the state
    vs.ping(0, "a", 2, t)                         # a comes back and acknowledges
    assert vs.get(0).num == 2
    vs.ping(0, "c", 0, t)
    assert vs.get(0) == View(2, "a", "b")


def test_only_primary_or_backup_of_view_n_can_be_primary_of_n_plus_1():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    vs.ping(0, "a", 2, 0.0)
    vs.ping(0, "c", 0, 0.0)                      # idle, never held the state
    t = 0.0
    for _ in range(20):                           # a and b both die; c keeps pinging
        t += PI
        vs.ping(0, "c", 0, t)
        vs.tick(t)
    assert vs.get(0).primary in ("a", "b")
    assert vs.get(0).primary != "c"


def test_dead_backup_removed_and_primary_serves_alone_unprotected():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    t = 0.0
    for _ in range(10):
        t += PI
        vs.ping(0, "a", vs.get(0).num, t)
        vs.tick(t)
    assert vs.get(0) == View(3, "a", "")
    st = vs.status(t)["0"]
    assert st["unprotected"] and st["primary"] == "a"


def test_pinging_keeps_a_server_alive():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "b", 0, 0.0)
    t = 0.0
    for _ in range(100):
        t += PI
        vs.ping(0, "a", vs.get(0).num, t)
        vs.ping(0, "b", vs.get(0).num, t)
        vs.tick(t)
    assert vs.get(0) == View(2, "a", "b")


def test_groups_are_independent():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(1, "x", 0, 0.0)
    assert vs.get(0) == View(1, "a", "")
    assert vs.get(1) == View(1, "x", "")


def test_restarted_view_server_resumes_with_the_last_primary():
    saved = {}
    vs = ViewService(PI, 5, save=saved.update)
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    vs.ping(0, "a", 2, 0.1)
    t = 0.1
    for _ in range(10):             # b dies: a goes on alone (b's state is now stale)
        t += PI
        vs.ping(0, "a", vs.get(0).num, t)
        vs.tick(t)
    assert saved[0] == View(3, "a", "")
    # the whole cluster restarts: b (stale) pings first, then a
    vs2 = ViewService(PI, 5)
    vs2.restore(dict(saved), 100.0)
    assert vs2.ping(0, "b", 0, 100.0) == View(3, "a", "")     # b cannot take over
    assert vs2.ping(0, "a", 0, 100.1) == View(4, "a", "")     # a resumes
    vs2.ping(0, "a", 4, 100.2)
    assert vs2.ping(0, "b", 0, 100.3) == View(5, "a", "b")


def test_restarted_view_server_lets_the_backup_resume_if_the_primary_stays_away():
    vs = ViewService(PI, 5)
    vs.restore({0: View(7, "a", "b")}, 50.0)
    assert vs.ping(0, "b", 0, 50.1) == View(7, "a", "b")      # grace: wait for a
    assert vs.ping(0, "c", 0, 60.0) == View(7, "a", "b")      # never a stranger
    assert vs.ping(0, "b", 0, 60.0) == View(8, "b", "")


def test_repeated_ping_0_from_the_same_process_is_not_a_restart():
    vs = make()
    vs.ping(0, "a", 0, 0.0, boot="A1")
    assert vs.ping(0, "a", 0, 0.05, boot="A1") == View(1, "a", "")   # first reply was lost
    vs.ping(0, "a", 1, 0.1, boot="A1")
    vs.ping(0, "b", 0, 0.1, boot="B1")
    assert vs.get(0) == View(2, "a", "b")
    vs.ping(0, "a", 2, 0.12, boot="A1")
    vs.ping(0, "a", 0, 0.15, boot="A1")                              # lost reply again
    assert vs.get(0) == View(2, "a", "b")
    vs.ping(0, "a", 0, 0.2, boot="A2")                               # a new process
    assert vs.get(0) == View(3, "b", "")


def test_a_stalled_view_server_does_not_count_its_own_stall_as_missed_pings():
    vs = make()
    vs.ping(0, "a", 0, 0.0)
    vs.ping(0, "a", 1, 0.0)
    vs.ping(0, "b", 0, 0.0)
    vs.ping(0, "a", 2, 0.0)
    vs.ping(0, "b", 2, 0.0)
    vs.stalled(2.0)                 # nothing ran for 2 s
    vs.tick(2.05)
    assert vs.get(0) == View(2, "a", "b")
