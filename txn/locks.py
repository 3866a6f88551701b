"""A keyed S/X lock table for strict two-phase locking, with deadlock detection.

The shape is S3QL's ``MultiLock`` (one table, one `trio.Condition`), with trio's
``acquire`` / ``acquire_nowait`` split and ``statistics()``. Waiters are served in
arrival order per key (a newcomer never overtakes a conflicting waiter), except that an
upgrade S -> X goes first. Owners are transactions:
objects with ``id``, ``priority`` (smaller = older) and a writable ``doomed`` flag.

Deadlocks: whenever an owner is about to wait, the wait-for graph (waiter -> every other
holder of the key whose mode conflicts with the request) is searched for a cycle through
it (waiting also counts as waiting for the conflicting waiters queued ahead). The
victim is the *youngest* owner on the cycle (largest ``priority``, i.e. the latest
first-attempt time; ties by id): it has usually done the least work, and because a retried
transaction keeps its first-attempt time, it gets older with every retry and is
eventually never the victim -- no starvation. The victim is marked doomed and woken; its
pending ``acquire`` raises `Deadlock`, and its owner must abort (releasing its locks).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Hashable, Protocol

import trio

from .errors import Deadlock, LockTimeout, TxnAborted

MODES = ("S", "X")


class Owner(Protocol):
    id: int
    priority: float
    doomed: bool


@dataclass(frozen=True)
class LockStatistics:
    keys_locked: int
    owners: int
    waiting: int
    acquired: int
    waits: int
    deadlocks: int
    timeouts: int


class LockManager:
    """Lock table: ``key -> {owner: mode}``. Locks are released only by `release_all`.

    `acquire` never returns a weaker lock than asked; holding X satisfies S; S -> X is an
    upgrade (granted when no other owner holds the key).
    """

    def __init__(self, timeout: float | None = None):
        self.timeout = math.inf if timeout is None else timeout
        self._cond = trio.Condition()
        self._table: dict[Hashable, dict[Any, str]] = {}
        self._held: dict[Any, dict[Hashable, str]] = defaultdict(dict)
        self._waiting: dict[Any, tuple[Hashable, str]] = {}
        self._queues: dict[Hashable, list] = {}   # key -> waiting owners, arrival order
        self._acquired = self._waits = self._deadlocks = self._timeouts = 0

    # ---- queries --------------------------------------------------------------------

    def held(self, owner) -> dict[Hashable, str]:
        """The keys `owner` holds, with their modes."""
        return dict(self._held.get(owner, {}))

    def holders(self, key: Hashable) -> dict[Any, str]:
        return dict(self._table.get(key, {}))

    def statistics(self) -> LockStatistics:
        return LockStatistics(len(self._table), len(self._held), len(self._waiting),
                              self._acquired, self._waits, self._deadlocks, self._timeouts)

    # ---- acquire / release ----------------------------------------------------------

    def _ahead(self, owner, key, mode) -> list:
        """Waiters queued for `key` before `owner` (all, if it is not queued) whose
        requests conflict with `mode`: FIFO fairness, so that a stream of readers
        cannot starve a writer."""
        out = []
        for o in self._queues.get(key, ()):
            if o is owner:
                break
            if not o.doomed and (mode == "X" or self._waiting[o][1] == "X"):
                out.append(o)
        return out

    def _grantable(self, owner, key, mode) -> bool:
        holders = self._table.get(key)
        mine = holders.get(owner) if holders else None
        if mine == "X" or mine == mode:
            return True
        if holders:
            if mode == "S":
                ok = all(m == "S" for o, m in holders.items() if o is not owner)
            else:
                ok = all(o is owner for o in holders)
            if not ok:
                return False
        # a newcomer does not overtake conflicting waiters; an upgrade does (the
        # upgrader already holds the key: making it queue would only make deadlocks)
        return mine is not None or not self._ahead(owner, key, mode)

    def _grant(self, owner, key, mode) -> None:
        holders = self._table.setdefault(key, {})
        if holders.get(owner) != "X":
            holders[owner] = mode
            self._held[owner][key] = mode
        self._acquired += 1

    def acquire_nowait(self, owner, key: Hashable, mode: str = "X") -> None:
        """Take the lock now or raise `trio.WouldBlock` (never waits, never detects)."""
        _check_mode(mode)
        if owner.doomed:
            raise TxnAborted(f"transaction {owner.id} was chosen as a deadlock victim")
        if not self._grantable(owner, key, mode):
            raise trio.WouldBlock
        self._grant(owner, key, mode)

    async def acquire(self, owner, key: Hashable, mode: str = "X",
                      timeout: float | None = None) -> None:
        """Take `key` in `mode` for `owner`, waiting as long as needed.

        Raises `Deadlock` if `owner` is (or becomes, while waiting) a deadlock victim,
        `LockTimeout` after `timeout` (default: the table's) seconds of waiting. On any
        exception the lock is not granted; locks already held stay held.
        """
        _check_mode(mode)
        try:
            self.acquire_nowait(owner, key, mode)
        except trio.WouldBlock:
            pass
        else:
            # granted without waiting: no scheduling round here, commits are hot
            return
        self._waits += 1
        timeout = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + timeout
        async with self._cond:
            self._waiting[owner] = (key, mode)
            self._queues.setdefault(key, []).append(owner)
            try:
                while True:
                    if owner.doomed:
                        raise Deadlock(f"transaction {owner.id} aborted to break a deadlock "
                                       f"(waiting for {mode} on {key!r})")
                    if self._grantable(owner, key, mode):
                        self._grant(owner, key, mode)
                        return
                    cycle = self._find_cycle(owner)
                    if cycle:
                        self._deadlocks += 1
                        victim = max(cycle, key=lambda o: (o.priority, o.id))
                        victim.doomed = True
                        if victim is owner:
                            raise Deadlock(
                                f"transaction {owner.id} aborted to break a deadlock "
                                f"(cycle {[o.id for o in cycle]})", [o.id for o in cycle])
                        self._cond.notify_all()
                    if trio.current_time() >= deadline:
                        self._timeouts += 1
                        raise LockTimeout(f"transaction {owner.id}: no {mode} lock on {key!r} "
                                          f"after {timeout:g} s (held by "
                                          f"{[o.id for o in self._table.get(key, {})]})")
                    with trio.move_on_at(deadline):
                        await self._cond.wait()
            finally:
                del self._waiting[owner]
                queue = self._queues[key]
                queue.remove(owner)
                if queue:
                    self._cond.notify_all()    # those queued behind us may go now
                else:
                    del self._queues[key]

    async def release_all(self, owner) -> None:
        """Release every lock of `owner` (commit/abort) and wake the waiters."""
        keys = self._held.pop(owner, {})
        for key in keys:
            holders = self._table[key]
            del holders[owner]
            if not holders:
                del self._table[key]
        # Waiters register in _waiting under the condition's lock before they sleep, and
        # re-check the table after acquiring it; so with none registered, nobody can
        # miss this release and the (yielding) lock acquisition can be skipped.
        if keys and self._waiting:
            with trio.CancelScope(shield=True):   # a lost wake-up would strand waiters
                async with self._cond:
                    self._cond.notify_all()

    # ---- the wait-for graph -----------------------------------------------------------

    def _blockers(self, owner) -> list:
        want = self._waiting.get(owner)
        if want is None or owner.doomed:
            return []
        key, mode = want
        holders = self._table.get(key, {})
        out = [o for o, m in holders.items() if o is not owner and (mode == "X" or m == "X")]
        if owner not in holders:
            out += self._ahead(owner, key, mode)
        return out

    def _find_cycle(self, start) -> list | None:
        """A wait-for cycle through `start` as a list of owners, or None (iterative DFS)."""
        path = [start]
        stack = [iter(self._blockers(start))]
        on_path = {id(start)}
        seen = {id(start)}
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                on_path.discard(id(path.pop()))
                continue
            if nxt is start:
                return list(path)
            if id(nxt) in seen:
                continue
            seen.add(id(nxt))
            path.append(nxt)
            on_path.add(id(nxt))
            stack.append(iter(self._blockers(nxt)))
        return None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"lock mode must be 'S' or 'X', not {mode!r}")
