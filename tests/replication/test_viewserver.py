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
