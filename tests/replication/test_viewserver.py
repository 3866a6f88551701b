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


def test_a_standby_resumes_the_stored_table_as_it_stands():
    """A view server taking over from etcd's table (view, acknowledgement, incarnations)
    changes no view; a silent primary is replaced only after dead_pings from the
    takeover, and a member whose process changed meanwhile counts as restarted."""
    old = ViewService(PI, 5)
    old.ping(0, "a", 0, 0.0, boot="A1")
    old.ping(0, "a", 1, 0.0, boot="A1")
    old.ping(0, "b", 0, 0.0, boot="B1")
    old.ping(0, "a", 2, 0.1, boot="A1")
    old.ping(1, "x", 0, 0.1, boot="X1")
    table = old.table()
    assert table[0] == dict(num=2, primary="a", backup="b", acked=True,
                            given={"a": "A1", "b": "B1"})
    vs = ViewService(PI, 5)
    vs.resume(table, 50.0)
    assert vs.ping(0, "b", 2, 50.1, boot="B1") == View(2, "a", "b")
    t = 50.1
    while t < 50.0 + 5 * PI - 0.01:          # a silent, but not yet for dead_pings
        t += PI / 2
        assert vs.ping(0, "b", 2, t, boot="B1") == View(2, "a", "b")
    t = 50.0 + DEAD
    vs.ping(0, "b", 2, t, boot="B1")
    assert vs.get(0) == View(3, "b", "")
    # group 1's primary restarted in between: its view goes to the new process
    assert vs.ping(1, "x", 0, 50.2, boot="X2") == View(2, "x", "")
    assert vs.table()[1]["given"] == {"x": "X2"}


def test_views_json_records_resume_conservatively():
    vs = ViewService(PI, 5)
    vs.resume({0: dict(num=7, primary="a", backup="b")}, 50.0)
    assert vs.ping(0, "b", 0, 50.1) == View(7, "a", "b")      # as restore: wait for a
    assert vs.ping(0, "a", 0, 50.2) == View(8, "a", "")


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


# ---- restarts: a view is given to one incarnation (boot id) of each server ----------

def protected_pair(t=0.0):
    """View 2: primary a (process A1), backup b (process B1), acknowledged."""
    vs = make()
    vs.ping(0, "a", 0, t, boot="A1")
    vs.ping(0, "a", 1, t, boot="A1")
    vs.ping(0, "b", 0, t, boot="B1")
    vs.ping(0, "a", 2, t, boot="A1")
    vs.ping(0, "b", 2, t, boot="B1")
    assert vs.get(0) == View(2, "a", "b") and vs.status(t)["0"]["acked"]
    return vs


def run(vs, t, until, **boots):
    """The servers named (with their boot ids) ping every PI from t to `until`, each
    acknowledging the view it was last told; the others are silent. Returns the time."""
    told = {s: 0 for s in boots}
    while t < until - 1e-9:
        t += PI
        for s, boot in boots.items():
            told[s] = vs.ping(0, s, told[s], t, boot=boot).num
        vs.tick(t)
    return t


def test_restarted_server_out_of_the_view_counts_again_and_is_recruited_as_backup():
    vs = protected_pair()
    assert vs.ping(0, "b", 0, 0.1, boot="B2") == View(3, "a", "")    # restarted: removed
    t = run(vs, 0.1, 1.0, a="A1", b="B2")
    assert vs.get(0) == View(4, "a", "b")                             # and back as backup
    t = run(vs, t, t + 1.0, b="B2")                                   # a dies alone
    assert vs.get(0) == View(5, "b", "")                              # failover to b


def test_both_restarted_the_primary_comes_back_as_primary_the_backup_as_backup():
    vs = protected_pair()
    t = run(vs, 0.0, 1.0)                           # both killed: silent, then dead
    assert vs.get(0) == View(2, "a", "b")
    assert vs.ping(0, "b", 0, t, boot="B2") == View()      # wait for the primary (and
    assert vs.get(0) == View(2, "a", "b")                  # do not tell b a view of B1)
    assert vs.ping(0, "a", 0, t + 0.01, boot="A2") == View(3, "a", "")
    t = run(vs, t, t + 1.0, a="A2", b="B2")
    assert vs.get(0) == View(4, "a", "b") and vs.status(t)["0"]["acked"]
    t = run(vs, t, t + 1.0, b="B2")                 # later the primary is killed alone
    assert vs.get(0) == View(5, "b", "")


def test_backup_killed_with_the_primary_does_not_take_over_when_the_primary_is_dead():
    vs = protected_pair()
    vs.ping(0, "b", 2, 0.05, boot="B1")            # both killed just after b's last ping
    vs.tick(0.52)                                   # a is dead; b, 0.47 s silent, not yet
    assert vs.status(0.52)["0"]["servers"]["b"]["dead"] is False
    assert vs.get(0) == View(2, "a", "b")          # but it may have died with a: wait
    t = run(vs, 0.52, 1.5)
    assert vs.ping(0, "a", 0, t, boot="A2") == View(3, "a", "")
    # whereas a backup that pinged just now takes over at once
    vs = protected_pair()
    vs.ping(0, "b", 2, 0.5, boot="B1")
    vs.tick(0.51)
    assert vs.get(0) == View(3, "b", "")


def test_primary_killed_with_the_backup_does_not_drop_it_alone():
    vs = protected_pair()
    vs.ping(0, "a", 2, 0.05, boot="A1")            # both killed just after a's last ping
    vs.tick(0.52)                                   # b is dead; a, 0.47 s silent, not yet
    assert vs.get(0) == View(2, "a", "b")          # a view for a alone could stall the
    t = run(vs, 0.52, 1.5)                          # group for good, should a never return
    back = t + PI
    t = run(vs, t, back + vs.grace + 0.2, b="B2")   # only b returns; a stays away
    assert vs.get(0) == View(3, "b", "")


def test_both_restarted_within_the_dead_window_the_primary_stays_primary():
    vs = protected_pair()
    # a's new process pings 0.3 s after both were killed: b's last ping is not dead yet,
    # but too old to trust that b survived; the view server waits instead of handing
    # the group to b
    assert vs.ping(0, "a", 0, 0.3, boot="A2") == View()
    assert vs.get(0) == View(2, "a", "b")
    assert vs.ping(0, "b", 0, 0.35, boot="B2") == View(3, "a", "")
    run(vs, 0.35, 1.5, a="A2", b="B2")
    assert vs.get(0) == View(4, "a", "b")


def test_both_restarted_backup_first_within_the_dead_window():
    vs = protected_pair()
    assert vs.ping(0, "b", 0, 0.3, boot="B2") == View()    # a may be dead too: wait
    assert vs.get(0) == View(2, "a", "b")
    assert vs.ping(0, "a", 0, 0.35, boot="A2") == View(3, "a", "")
    run(vs, 0.35, 1.5, a="A2", b="B2")
    assert vs.get(0) == View(4, "a", "b")


def test_restarted_primary_whose_backup_died_is_primary_of_the_next_view():
    vs = protected_pair()
    t = run(vs, 0.0, 1.0, a="A1")                   # b dies: a alone in view 3
    assert vs.get(0) == View(3, "a", "")
    t = run(vs, t, t + 2.0)                         # then a dies too
    assert vs.ping(0, "a", 0, t, boot="A2") == View(4, "a", "")


def test_restarted_primary_hands_over_only_to_a_backup_that_pinged_recently():
    vs = protected_pair()
    assert vs.ping(0, "a", 0, 0.3, boot="A2") == View()    # b silent for 0.3 s: wait
    assert vs.get(0) == View(2, "a", "b")
    assert vs.ping(0, "b", 2, 0.32, boot="B1") == View(3, "b", "")  # b alive, in sync


def test_restarted_primary_of_an_unacknowledged_view_is_primary_again():
    vs = make()
    vs.ping(0, "a", 0, 0.0, boot="A1")
    vs.ping(0, "a", 1, 0.0, boot="A1")
    vs.ping(0, "b", 0, 0.0, boot="B1")
    assert vs.get(0) == View(2, "a", "b")          # a transfers its state to b...
    # ...and restarts before acknowledging: b may lack the state, a has it on disk
    assert vs.ping(0, "a", 0, 0.2, boot="A2") == View(3, "a", "b")
    assert not vs.status(0.2)["0"]["acked"]


def test_a_view_given_to_a_previous_incarnation_is_never_acknowledged():
    vs = make()
    vs.ping(0, "a", 0, 0.0, boot="A1")
    vs.ping(0, "a", 1, 0.0, boot="A1")
    vs.ping(0, "b", 0, 0.0, boot="B1")
    assert vs.get(0) == View(2, "a", "b")
    # a new process of a claims view 2, which was given to A1
    assert vs.ping(0, "a", 2, 0.2, boot="A2") == View(3, "a", "b")
    assert not vs.status(0.2)["0"]["acked"]
    vs.ping(0, "a", 3, 0.3, boot="A2")
    assert vs.status(0.3)["0"]["acked"]
    # the old process, still around somewhere, cannot acknowledge a later view
    vs2 = make()
    vs2.ping(0, "a", 0, 0.0, boot="A1")
    vs2.ping(0, "a", 0, 0.1, boot="A2")            # view 1 given to A1: now A2's
    assert vs2.get(0) == View(2, "a", "")
    vs2.ping(0, "a", 2, 0.2, boot="A1")
    assert not vs2.status(0.2)["0"]["acked"]


def test_restarted_backup_of_an_acknowledged_view_takes_over_if_the_primary_stays_away():
    vs = protected_pair()
    t = run(vs, 0.0, 1.0)                           # both die
    back = t + PI
    t = run(vs, t, back + vs.grace - 0.2, b="B2")   # only b comes back: wait for a
    assert vs.get(0) == View(2, "a", "b")
    t = run(vs, t, back + vs.grace + 0.2, b="B2")   # a away for the grace period
    assert vs.get(0) == View(3, "b", "")


def test_restarted_backup_of_an_unacknowledged_view_never_becomes_primary():
    vs = make()
    vs.ping(0, "a", 0, 0.0, boot="A1")
    vs.ping(0, "a", 1, 0.0, boot="A1")
    vs.ping(0, "b", 0, 0.0, boot="B1")
    assert vs.get(0) == View(2, "a", "b")          # not acknowledged: b may lack the state
    run(vs, 0.0, 10.0, b="B2", c="C1")
    assert vs.get(0) == View(2, "a", "b")
    assert vs.ping(0, "a", 0, 10.1, boot="A2") == View(3, "a", "c")


def test_a_restarted_member_is_not_told_the_view_of_its_previous_incarnation():
    vs = protected_pair()
    # a's new process while the view server waits for b (silent 0.3 s): told nothing, so
    # it does not act as primary of view 2 (and stream its state into b)
    assert vs.ping(0, "a", 0, 0.3, boot="A2") == View()
    assert vs.ping(0, "a", 0, 0.4, boot="A2") == View()
    assert vs.ping(0, "b", 2, 0.45, boot="B1") == View(3, "b", "")
    assert vs.ping(0, "a", 0, 0.5, boot="A2") == View(3, "b", "")  # idle now: told
    # the backup of a view not yet acknowledged is told: its primary must sync it
    vs = make()
    vs.ping(0, "a", 0, 0.0, boot="A1")
    vs.ping(0, "a", 1, 0.0, boot="A1")
    vs.ping(0, "b", 0, 0.0, boot="B1")
    assert vs.ping(0, "b", 0, 0.1, boot="B2") == View(2, "a", "b")
    vs.ping(0, "a", 2, 0.2, boot="A1")              # a synced B2 and acknowledges
    assert vs.get(0) == View(3, "a", "")            # B2 may not be in sync: dropped
    run(vs, 0.2, 1.0, a="A1", b="B2")
    assert vs.get(0) == View(4, "a", "b")


def protected(vs):
    """a primary, b backup of acknowledged view 2; c idle."""
    vs.ping(0, "a", 0, 0.0, "A")
    vs.ping(0, "a", 1, 0.0, "A")
    vs.ping(0, "b", 0, 0.0, "B")
    vs.ping(0, "a", 2, 0.1, "A")
    vs.ping(0, "c", 0, 0.1, "C")
    assert vs.get(0) == View(2, "a", "b")


@pytest.mark.parametrize("gone, stays, after", [
    ("a", "b", View(3, "b", "c")),      # the primary's process died: the backup takes over
    ("b", "a", View(3, "a", "c")),      # the backup's: the primary goes on with c
])
def test_a_member_that_hung_up_is_dead_after_one_interval_not_five(gone, stays, after):
    vs = make()
    protected(vs)
    vs.hung_up(0, gone, gone.upper(), 0.15)     # its kernel closed its ping connection
    vs.ping(0, stays, 2, 0.2, stays.upper())
    vs.ping(0, "c", 0, 0.2, "C")
    vs.tick(0.2)
    assert vs.get(0) == View(2, "a", "b")   # not before a ping interval passed
    vs.ping(0, stays, 2, 0.26, stays.upper())
    vs.tick(0.26)
    assert vs.get(0) == after


def test_a_server_that_hangs_up_and_pings_again_at_once_stays():
    vs = make()
    protected(vs)
    vs.hung_up(0, "a", "A", 0.15)           # gave up on a slow answer, reconnected
    vs.ping(0, "a", 2, 0.16, "A")
    vs.ping(0, "b", 2, 0.3, "B")
    vs.tick(0.3)
    assert vs.get(0) == View(2, "a", "b")


def test_a_hang_up_of_an_older_incarnation_does_not_count():
    vs = make()
    protected(vs)
    vs.ping(0, "c", 0, 0.12, "C2")          # c restarted; then its old connection ends
    vs.hung_up(0, "c", "C", 0.13)
    vs.hung_up(0, "a", "A", 0.15)
    vs.ping(0, "b", 2, 0.3, "B")
    vs.ping(0, "c", 0, 0.3, "C2")
    vs.tick(0.3)
    assert vs.get(0) == View(3, "b", "c")   # c, alive in its new incarnation, recruited


def test_a_backup_that_hung_up_with_its_primary_does_not_take_over():
    vs = make()
    protected(vs)
    vs.ping(0, "b", 2, 0.14, "B")
    vs.hung_up(0, "a", "A", 0.15)
    vs.hung_up(0, "b", "B", 0.16)           # killed together, a few ms apart
    vs.ping(0, "c", 0, 0.25, "C")
    vs.tick(0.255)                          # a dead; b not yet, but it hung up too
    assert vs.get(0) == View(2, "a", "b")
    vs.tick(0.3)
    assert vs.get(0) == View(2, "a", "b")   # wait for one of them to come back
    vs.ping(0, "b", 0, 0.5, "B2")           # the backup restarted: not the newest state
    vs.tick(0.5)
    assert vs.get(0).primary != "c"


def test_a_server_without_a_copy_is_never_made_primary():
    """A replica made anew (replication/needscopy.py) pings with copy=False: it is not
    the first primary, nor a restarted backup's stand-in, nor the primary after a view
    server restart; it is recruited as a backup, and counts again once it has a copy."""
    vs = make()
    assert vs.ping(0, "a", 0, 0.0, boot="A1", copy=False) == View()   # not the first
    assert vs.ping(0, "b", 0, 0.01, boot="B1") == View(1, "b", "")
    assert vs.ping(0, "b", 1, 0.1, boot="B1") == View(2, "b", "a")   # but a backup
    assert vs.status(0.1)["0"]["servers"]["a"]["no_copy"]
    vs.ping(0, "a", 2, 0.1, boot="A1", copy=False)
    vs.ping(0, "b", 2, 0.2, boot="B1")
    # the copy never arrives, and the primary dies: the group waits for it
    run_nocopy(vs, 0.2, 10.0, "a", boot="A1", told=2)
    assert vs.get(0) == View(2, "b", "a")
    # a restarted backup made anew does not take over when the primary stays away
    vs = protected_pair()
    t = run(vs, 0.0, 1.0)                                   # both die
    t = run_nocopy(vs, t, t + vs.grace + 1.0, "b", boot="B2")
    assert vs.get(0) == View(2, "a", "b")
    # nor after a view server restart (views.json): the primary resumes, not it
    vs2 = make()
    vs2.restore({0: View(2, "a", "b")}, 0.0)
    for t in (0.1, vs2.grace + 0.5):
        vs2.ping(0, "b", 2, t, boot="B2", copy=False)
        vs2.tick(t)
    assert vs2.get(0) == View(2, "a", "b")
    assert vs2.ping(0, "a", 2, vs2.grace + 0.6, boot="A2").primary == "a"


def run_nocopy(vs, t, until, server, boot="", told=0):
    """`server` pings every PI with copy=False (acknowledging what it was told)."""
    while t < until - 1e-9:
        t += PI
        told = vs.ping(0, server, told, t, boot=boot, copy=False).num
        vs.tick(t)
    return t
