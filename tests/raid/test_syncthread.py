"""The array's sync thread (raid/syncthread.py): many waiters, errors, close."""

import threading

import pytest
import trio

from replfs.raid.syncthread import FanOut, SyncThread


async def test_many_tasks_each_get_their_own_result_in_the_thread():
    st = SyncThread()
    threads = set()
    gate = threading.Event()

    def job(i):
        gate.wait(10)           # the first request holds the rest back: they all queue
        threads.add(threading.current_thread().name)
        return i * 2

    results = {}

    async def one(i):
        results[i] = await st.run(lambda: job(i))

    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == {i: 2 * i for i in range(40)}
    assert threads == {"replfs-sync"}
    st.close()


async def test_an_error_reaches_its_caller_and_the_thread_goes_on():
    st = SyncThread()
    with pytest.raises(ZeroDivisionError):
        await st.run(lambda: 1 / 0)
    assert await st.run(lambda: "still here") == "still here"
    st.close()
    with pytest.raises(RuntimeError, match="closed"):
        await st.run(lambda: None)


async def test_a_cancelled_caller_still_waits_for_its_request():
    st = SyncThread()
    gate = threading.Event()
    done = []

    def job():
        gate.wait(10)
        done.append(1)

    async def release():
        await trio.sleep(0.2)
        gate.set()
    async with trio.open_nursery() as n:
        n.start_soon(release)
        with trio.move_on_after(0.05):
            await st.run(job)   # its caller's deadline passes: it waits on
        assert done == [1]      # run() returned only once the job had run
    st.close()


def test_close_without_use_and_twice():
    st = SyncThread()
    st.close()
    st.close()


def test_fanout_runs_items_side_by_side_and_keeps_their_order():
    fan = FanOut(3)
    barrier = threading.Barrier(4, timeout=10)   # only passes if all four run at once
    names = []

    def job(i):
        barrier.wait()
        names.append(threading.current_thread().name)
        return i * 10

    try:
        assert fan.map(job, [0, 1, 2, 3]) == [0, 10, 20, 30]
        assert threading.current_thread().name in names     # the first ran here
        assert len(set(names)) == 4
        assert fan.map(job, []) == []
    finally:
        fan.close()


def test_fanout_raises_after_every_item_is_done():
    fan = FanOut(2)
    done = []

    def job(i):
        if i == 1:
            raise OSError(5, "member gone")
        done.append(i)
        return i

    try:
        with pytest.raises(OSError, match="member gone"):
            fan.map(job, [0, 1, 2])
        assert sorted(done) == [0, 2]
    finally:
        fan.close()
    with pytest.raises(RuntimeError):
        fan.map(job, [0, 2])
