"""One worker thread for an array's fsyncs, with a cheaper hand-off than trio's.

An `Array.flush` is on the path of every `fsync` (on both replicas) and of every forced
commit. Its fdatasyncs must run outside the event loop, and `trio.to_thread.run_sync`
costs about 90 us a call here (a capacity limiter, the thread cache, and the answer
through `run_sync_soon`); a thread of our own that takes requests from a queue and
reports through an eventfd, which the waiting task watches with `wait_readable`, costs
about half that. One request (one flush) runs at a time; any number of tasks may wait:
one of them watches the eventfd and wakes the others, each of which looks whether its
own request is done.

`FanOut` is the other half: a flush of several members runs their fdatasyncs side by
side, the calling thread doing the first and threads of its own the rest. Two image
files on one host device here sync in 0.18-0.21 ms side by side against 0.27-0.33 ms
one after the other, and a `ThreadPoolExecutor.map` gave back most of the gain in its
hand-off (0.26-0.33 ms).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

import trio


class _Request:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class SyncThread:
    """Runs `fn()` in its own thread: `await run(fn)` (not cancellable: like
    `trio.to_thread.run_sync`, it returns once `fn` did). `close()` ends the thread."""

    def __init__(self, name: str = "replfs-sync"):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._efd: int | None = None
        self._thread: threading.Thread | None = None
        self._watching = False                  # a task waits on the eventfd
        self._waiters: list[trio.Event] = []    # tasks waiting for that one
        self._closed = False

    def _start(self) -> None:
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        efd = self._efd
        while True:
            req = self._queue.get()
            if req is None:
                return
            try:
                req.result = req.fn()
            except BaseException as exc:    # handed to the waiting task
                req.error = exc
            req.done = True
            os.eventfd_write(efd, 1)

    async def run(self, fn: Callable[[], Any]) -> Any:
        if self._closed:
            raise RuntimeError("the sync thread is closed")
        if self._thread is None:
            self._start()
        req = _Request(fn)
        self._queue.put(req)
        with trio.CancelScope(shield=True):     # fn runs whatever happens: wait for it
            while not req.done:
                if self._watching:
                    ev = trio.Event()
                    self._waiters.append(ev)
                    await ev.wait()
                    continue
                self._watching = True
                try:
                    await trio.lowlevel.wait_readable(self._efd)
                    try:
                        os.eventfd_read(self._efd)
                    except BlockingIOError:
                        pass
                finally:
                    self._watching = False
                    waiters, self._waiters = self._waiters, []
                    for ev in waiters:      # each looks at its own request again
                        ev.set()
        if req.error is not None:
            raise req.error
        return req.result

    def close(self) -> None:
        """Let the thread finish what it was given, end it, close the eventfd."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        try:
            trio.lowlevel.notify_closing(self._efd)
        except RuntimeError:            # not inside a trio run: nobody watches it
            pass
        os.close(self._efd)


class FanOut:
    """`map(fn, items)`: `fn(items[0])` in the calling thread, the other items in up to
    `n` threads of its own (started when first needed), side by side; returns the
    results in order. An exception of `fn` is raised to the caller once every item is
    done. For plain blocking calls (fdatasync), from any thread."""

    def __init__(self, n: int, name: str = "replfs-fanout"):
        self.n = n
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._closed = False

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, item, i, out = job
            try:
                out.put((i, fn(item), None))
            except BaseException as exc:     # handed to the caller
                out.put((i, None, exc))

    def _ensure(self, want: int) -> None:
        with self._start_lock:
            if self._closed:
                raise RuntimeError("the fan-out is closed")
            while len(self._threads) < min(want, self.n):
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"{self.name}-{len(self._threads)}")
                t.start()
                self._threads.append(t)

    def map(self, fn: Callable[[Any], Any], items: list) -> list:
        if len(items) <= 1 or self.n <= 0:
            return [fn(x) for x in items]
        self._ensure(len(items) - 1)
        out: queue.SimpleQueue = queue.SimpleQueue()
        for i, item in enumerate(items[1:], 1):
            self._queue.put((fn, item, i, out))
        results: list = [None] * len(items)
        error: BaseException | None = None
        try:
            results[0] = fn(items[0])
        except BaseException as exc:
            error = exc
        for _ in range(len(items) - 1):
            i, res, exc = out.get()
            results[i] = res
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        """End the threads once they finished what they were given."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            t.join()
