"""Rebuild and scrub as background work of an array in use (a running server's).

`ArrayJobs` runs at most one job at a time -- a rebuild of one member or a scrub -- as a
trio task. Each step (one batch of `ONLINE_BATCH` bytes per member, `rebuild_steps` /
`scrub_steps`) runs in a worker thread under the array's lock, so the event loop keeps
serving between steps and no lock hold is long. The task paces itself as md does with
`speed_limit_min` / `speed_limit_max`: while the array's own reads and writes move
(`Array.io_calls`), it goes no faster than `speed_min`; when the array is idle, no faster
than `speed_max` (0: no limit). Speeds count bytes per member per second, as md's do.

A job can be paused (it waits between two steps), resumed and cancelled. A cancelled
rebuild leaves the member "rebuilding" at the position it reached (fsynced, in the
superblocks); starting the rebuild again resumes there. The job's record (kind, disk,
state, speeds, position) is kept in the array's state file, so that a server restarted in
the middle -- or `replfs raid status` in another process -- knows of it: `run()` resumes a
rebuild that was running or paused when the process stopped (and any member found
"rebuilding" without a cancelled job), at the position its superblocks recorded.

A scrub lists the logical blocks it found beyond repair (`lost_blocks`, raid/scrub.py).
Given a `heal` callback (`async heal(block) -> bool`, the layer above's: a replicated
server fetches the block from the other replica and rewrites it through the array), the
job asks it for each such block once the scan is done, and its result counts `healed`
and keeps in `lost_blocks` only those that stayed lost.
"""

from __future__ import annotations

import functools
import logging
import time

import trio

from typing import Awaitable, Callable

from .dirfiles import read_state, update_state
from .errors import RaidError

log = logging.getLogger("replfs.raid.jobs")

ONLINE_BATCH = 1 << 20       # bytes per member per step of a background job
SPEED_MIN = 32 << 20         # bytes/s per member while the array serves I/O (md: 1 MB/s)
SPEED_MAX = 0                # bytes/s per member when idle; 0: no limit (md: 200 MB/s)
SAVE_SECS = 2.0              # how often a running job's record is saved
ACTIVE = ("running", "paused")


def _step(gen):
    """One step of a step generator: (False, yielded) or (True, returned value)."""
    try:
        return False, next(gen)
    except StopIteration as stop:
        return True, stop.value


class ArrayJob:
    """One background rebuild or scrub: what it is, how far it got, how fast it goes."""

    def __init__(self, kind: str, disk: int | None, rows: int, row: int, row_bytes: int,
                 speed_min: int, speed_max: int):
        self.kind = kind
        self.disk = disk
        self.rows = rows
        self.row = row
        self.first_row = row
        self.row_bytes = row_bytes
        self.speed_min = speed_min
        self.speed_max = speed_max
        self.state = "running"
        self.error = ""
        self.result: dict | None = None
        self.started = time.time()
        self.active = 0.0          # seconds spent running (pauses excluded)
        self.throttled = False     # the last step was held to speed_min
        self.stopped = False       # its task ended
        self.waiting = False       # paused, and the step under way when paused is done
        self.scope = trio.CancelScope()
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def rate(self) -> float:
        """Bytes per member per second since this run of the job began."""
        done = (self.row - self.first_row) * self.row_bytes
        return done / self.active if self.active > 0 else 0.0

    def status(self) -> dict:
        rate = self.rate()
        left = (self.rows - self.row) * self.row_bytes
        return dict(kind=self.kind, disk=self.disk, state=self.state, row=self.row,
                    rows=self.rows, first_row=self.first_row, waiting=self.waiting, progress=round(self.row / self.rows, 4) if self.rows else 1,
                    bytes_per_sec=round(rate), eta_seconds=round(left / rate, 1) if rate and
                    self.state == "running" else None, speed_min=self.speed_min,
                    speed_max=self.speed_max, throttled=self.throttled, error=self.error,
                    started=self.started, result=self.result)

    def record(self) -> dict:
        """What the state file keeps of it."""
        return dict(kind=self.kind, disk=self.disk, state=self.state, row=self.row,
                    rows=self.rows, first_row=self.first_row, waiting=self.waiting, speed_min=self.speed_min, speed_max=self.speed_max,
                    error=self.error, started=self.started, saved=time.time())


class ArrayJobs:
    """The background jobs of one open array. `run()` is a long-lived task (start it with
    `nursery.start`); the other methods are called from trio tasks of the same run and
    raise RaidError with a sentence for the operator when they cannot do what is asked."""

    def __init__(self, array, batch_bytes: int = ONLINE_BATCH,
                 heal: Callable[[int], Awaitable[bool]] | None = None):
        self.array = array
        self.heal = heal
        self.job: ArrayJob | None = None
        self.batch_rows = max(1, batch_bytes // array.geo.chunk)
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._resume_saved()
            task_status.started()
            await trio.sleep_forever()

    async def _resume_saved(self) -> None:
        saved = read_state(self.array.dir).get("job") or {}
        for d in self.array.disks:
            if d.state != "rebuilding":
                continue
            mine = saved.get("kind") == "rebuild" and saved.get("disk") == d.index
            if mine and saved.get("state") == "cancelled":
                log.warning("disk %d is partly rebuilt (row %d of %d); its rebuild was %s: "
                            "start it again to resume", d.index, d.durable_pos,
                            self.array.geo.rows, saved.get("state"))
                continue
            mine = mine and saved.get("state") in ACTIVE
            sp = (saved.get("speed_min"), saved.get("speed_max")) if mine else (None, None)
            try:
                await self.start_rebuild(d.index, speed_min=sp[0], speed_max=sp[1],
                                         paused=mine and saved.get("state") == "paused")
                log.warning("resuming the rebuild of disk %d at row %d of %d", d.index,
                            d.rebuild_pos, self.array.geo.rows)
            except RaidError as exc:
                log.error("cannot resume the rebuild of disk %d: %s", d.index, exc)
            return

    # ---------------------------------------------------------------- commands
    def _check_idle(self) -> None:
        if self._nursery is None:
            raise RaidError("the array's background jobs are not running")
        j = self.job
        if j is not None and j.state in ACTIVE:
            what = f"a rebuild of disk {j.disk}" if j.kind == "rebuild" else "a scrub"
            raise RaidError(f"{what} is {j.state} ({j.row}/{j.rows} rows); wait for it, "
                            f"or cancel it first")

    async def start_rebuild(self, disk: int, image: str | None = None,
                            speed_min: int | None = None, speed_max: int | None = None,
                            paused: bool = False) -> dict:
        """Start (or resume, for a member left "rebuilding" and no new `image`) the
        rebuild of member `disk` in the background. The checks and the switch to the new
        image happen before this returns."""
        self._check_idle()
        arr = self.array
        steps = await trio.to_thread.run_sync(
            lambda: arr.rebuild_steps(disk, image, self.batch_rows))
        return self._launch("rebuild", disk, arr.disks[disk].rebuild_pos, steps,
                            speed_min, speed_max, paused)

    async def start_scrub(self, speed_min: int | None = None,
                          speed_max: int | None = None) -> dict:
        self._check_idle()
        steps = self.array.scrub_steps(batch_rows=self.batch_rows)
        return self._launch("scrub", None, 0, steps, speed_min, speed_max, False)

    def _launch(self, kind, disk, row, steps, speed_min, speed_max, paused) -> dict:
        g = self.array.geo
        job = ArrayJob(kind, disk, g.rows, row, g.chunk,
                       SPEED_MIN if speed_min is None else int(speed_min),
                       SPEED_MAX if speed_max is None else int(speed_max))
        if paused:
            job.state = "paused"
        self.job = job
        self._save()
        self._nursery.start_soon(self._drive, job, steps)
        return job.status()

    def _current(self, verb: str) -> ArrayJob:
        j = self.job
        if j is None or j.state not in ACTIVE:
            raise RaidError(f"nothing to {verb}: no rebuild or scrub is running")
        return j

    def pause(self) -> dict:
        return self._set_state("pause", "paused")

    def resume(self) -> dict:
        return self._set_state("resume", "running")

    def _set_state(self, verb: str, state: str) -> dict:
        j = self._current(verb)
        j.state = state
        j.notify()
        self._save()
        return j.status()

    def set_speed(self, speed_min: int | None, speed_max: int | None) -> dict:
        j = self._current("limit")
        if speed_min is not None:
            j.speed_min = int(speed_min)
        if speed_max is not None:
            j.speed_max = int(speed_max)
        j.notify()
        self._save()
        return j.status()

    async def cancel(self) -> dict:
        """Stop the job; a rebuild keeps its position (fsynced) for a later resume.
        Returns once it stopped."""
        j = self._current("cancel")
        j.state = "cancelled"
        self._save()
        j.scope.cancel()
        while not j.stopped:
            await j.changed.wait()
        return j.status()

    def status(self) -> dict | None:
        return self.job.status() if self.job is not None else None

    # ---------------------------------------------------------------- the task
    def _save(self) -> None:
        if self.job is not None:
            update_state(self.array.dir, job=self.job.record())

    async def _heal_lost(self, found: dict) -> None:
        """Ask `heal` for each block the scrub found beyond repair; `found` then counts
        the healed ones and lists those still lost (also in the state file)."""
        lost = found.get("lost_blocks") or []
        found["healed"] = 0
        if self.heal is None or not lost:
            return
        still = []
        for block in lost:
            if await self.heal(block):
                found["healed"] += 1
            else:
                still.append(block)
        found["lost_blocks"] = still
        if found["healed"]:
            log.warning("scrub: %d blocks beyond repair here were healed from elsewhere; "
                        "%d stay lost", found["healed"], len(still))
        sp = self.array.scrub_progress
        if sp is not None and "found" in sp:
            sp["found"].update(healed=found["healed"], lost_blocks=still)
            update_state(self.array.dir, scrub=sp)

    async def _drive(self, job: ArrayJob, steps) -> None:
        arr = self.array
        step = functools.partial(_step, steps)
        io_seen = arr.io_calls
        saved = trio.current_time()
        try:
            with job.scope:
                while True:
                    while job.state == "paused":
                        job.waiting = True
                        await job.changed.wait()
                    job.waiting = False
                    t0 = trio.current_time()
                    done, value = await trio.to_thread.run_sync(step)
                    dt = trio.current_time() - t0
                    job.active += dt
                    if done:
                        if job.kind == "scrub":
                            await self._heal_lost(value)
                        job.result = value
                        job.row = job.rows
                        job.state = "done"
                        break
                    nbytes = (value[0] - job.row) * job.row_bytes
                    job.row = value[0]
                    busy = arr.io_calls != io_seen
                    io_seen = arr.io_calls
                    limit = job.speed_min if busy else job.speed_max
                    job.throttled = busy and bool(limit)
                    if limit > 0 and nbytes / limit > dt:
                        pause = nbytes / limit - dt
                        await trio.sleep(pause)
                        job.active += pause
                    if trio.current_time() - saved > SAVE_SECS:
                        self._save()
                        saved = trio.current_time()
        except RaidError as exc:
            job.state = "failed"
            job.error = str(exc)
            log.error("%s stopped: %s", job.kind, exc)
        finally:
            with trio.CancelScope(shield=True):
                if job.state != "done":
                    # keeps what was done (a rebuild's position, fsynced)
                    await trio.to_thread.run_sync(steps.close)
                if job.state != "running":     # a stop of the process keeps "running"
                    self._save()
                job.stopped = True
                job.notify()
        if job.state == "done":
            log.info("%s done: %s", job.kind, job.result)
