"""One worker thread for an array's fsyncs, with a cheaper hand-off than trio's.

An `Array.flush` is on the path of every `fsync` (on both replicas) and of every forced
commit. Its fdatasyncs must run outside the event loop, and `trio.to_thread.run_sync`
costs about 90 us a call here (a capacity limiter, the thread cache, and the answer
through `run_sync_soon`); a thread of our own that takes requests from a queue and
reports through an eventfd, which the waiting task watches with `wait_readable`, costs
about half that. One request runs at a time (fsyncs of the same device gain nothing
from running side by side); any number of tasks may wait: one of them watches the
eventfd and wakes the others, each of which looks whether its own request is done.
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
