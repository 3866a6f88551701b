import pytest
import trio

from replfs.txn import Deadlock, LockManager, LockTimeout


class Owner:
    def __init__(self, id, priority=None):
        self.id = id
        self.priority = id if priority is None else priority
        self.doomed = False

    def __repr__(self):
        return f"T{self.id}"


async def test_shared_locks_are_compatible_exclusive_is_not():
    lm = LockManager(timeout=5)
    a, b, c = Owner(1), Owner(2), Owner(3)
    await lm.acquire(a, "k", "S")
    await lm.acquire(b, "k", "S")
    with pytest.raises(trio.WouldBlock):
        lm.acquire_nowait(c, "k", "X")
    got = []

    async def writer():
        await lm.acquire(c, "k", "X")
        got.append("c")

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await lm.release_all(a)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []          # b still holds S
        await lm.release_all(b)
    assert got == ["c"]
    assert lm.holders("k") == {c: "X"}
    st = lm.statistics()
    assert st.waits == 1 and st.keys_locked == 1


async def test_upgrade_when_sole_holder_and_reentrant():
    lm = LockManager()
    a = Owner(1)
    await lm.acquire(a, "k", "S")
    await lm.acquire(a, "k", "X")
    await lm.acquire(a, "k", "S")      # X satisfies S: stays X
    assert lm.held(a) == {"k": "X"}


async def test_upgrade_deadlock_picks_youngest_victim():
    lm = LockManager(timeout=5)
    old, young = Owner(1, priority=1.0), Owner(2, priority=2.0)
    await lm.acquire(old, "k", "S")
    await lm.acquire(young, "k", "S")
    outcome = {}

    async def upgrade(o):
        try:
            await lm.acquire(o, "k", "X")
            outcome[o.id] = "granted"
        except Deadlock as exc:
            outcome[o.id] = "victim"
            assert set(exc.cycle) <= {1, 2}
            await lm.release_all(o)

    async with trio.open_nursery() as n:
        n.start_soon(upgrade, old)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(upgrade, young)
    assert outcome == {1: "granted", 2: "victim"}
    assert lm.statistics().deadlocks == 1


async def test_three_way_cycle_victim_is_youngest_even_when_not_the_detector():
    lm = LockManager(timeout=5)
    t1, t2, t3 = Owner(1, 3.0), Owner(2, 1.0), Owner(3, 2.0)   # t1 is youngest
    for t, k in ((t1, "a"), (t2, "b"), (t3, "c")):
        await lm.acquire(t, k, "X")
    outcome = {}

    async def want(t, k):
        try:
            await lm.acquire(t, k, "X")
            outcome[t.id] = "ok"
        except Deadlock:
            outcome[t.id] = "victim"
        await lm.release_all(t)

    async with trio.open_nursery() as n:
        n.start_soon(want, t1, "b")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(want, t2, "c")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(want, t3, "a")       # closes the cycle; t3 detects, t1 is victim
    assert outcome == {1: "victim", 2: "ok", 3: "ok"}


async def test_lock_wait_times_out(autojump_clock):
    lm = LockManager(timeout=2.0)
    a, b = Owner(1), Owner(2)
    await lm.acquire(a, "k", "X")
    t0 = trio.current_time()
    with pytest.raises(LockTimeout):
        await lm.acquire(b, "k", "S")
    assert trio.current_time() - t0 == pytest.approx(2.0)
    assert lm.statistics().timeouts == 1
    assert lm.held(b) == {}


def test_bad_mode_rejected():
    with pytest.raises(ValueError):
        LockManager().acquire_nowait(Owner(1), "k", "W")


async def test_a_stream_of_readers_does_not_starve_a_writer(autojump_clock):
    lm = LockManager(timeout=100)
    got = {}

    async def reader(i):
        o = Owner(10 + i)
        await lm.acquire(o, "dir", "S")
        got.setdefault("readers", []).append((i, trio.current_time()))
        await trio.sleep(1.0)
        await lm.release_all(o)

    async def writer():
        o = Owner(1)
        await trio.sleep(0.25)
        await lm.acquire(o, "dir", "X")
        got["writer"] = trio.current_time()
        await trio.sleep(0.1)
        await lm.release_all(o)

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        for i in range(20):            # overlapping readers, one every 0.5 s
            n.start_soon(reader, i)
            await trio.sleep(0.5)
    # the writer waits only for the one reader holding the lock when it came
    assert got["writer"] == pytest.approx(1.0)
    assert lm.statistics().deadlocks == 0


async def test_queued_waiter_counts_in_the_wait_for_graph():
    # A holds k1 (S); W waits X on k1; B holds k2 and asks S on k1 (queued behind W);
    # A asks k2 -> cycle A -> B -> W -> A through the queue edge: detected.
    lm = LockManager(timeout=30)
    a, w, b = Owner(1, 1.0), Owner(2, 2.0), Owner(3, 3.0)
    await lm.acquire(a, "k1", "S")
    await lm.acquire(b, "k2", "X")
    out = {}

    async def want(o, key, mode):
        try:
            await lm.acquire(o, key, mode)
            out[o.id] = "ok"
        except Deadlock:
            out[o.id] = "victim"
        await lm.release_all(o)

    async with trio.open_nursery() as n:
        n.start_soon(want, w, "k1", "X")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(want, b, "k1", "S")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(want, a, "k2", "X")
    assert out[3] == "victim" and out[1] == "ok" and out[2] == "ok"
    assert lm.statistics().timeouts == 0
