"""A history recorder and a conflict-serializability checker.

The recorder keeps, in order, which transaction read or wrote which object, and which
transactions committed or aborted. Objects are either byte ranges of blocks
(`BlockRange(block, start, end)`; two ranges conflict when they overlap on the same
block) or any other hashable key named by the caller (equal keys conflict).

`check_serializable` builds the conflict graph over the committed transactions (an edge
Ti -> Tj for every pair of conflicting operations, Ti's first, at least one a write) and
reports a cycle if there is one; otherwise the history is conflict-serializable and a
serial order is returned.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, NamedTuple

import msgpack


class BlockRange(NamedTuple):
    block: int
    start: int
    end: int


class Event(NamedTuple):
    txn: int
    op: str        # "r" or "w"
    obj: Hashable  # BlockRange or a caller-named key


class HistoryRecorder:
    """Append-only log of read/write events plus commit/abort outcomes (in memory)."""

    def __init__(self):
        self.events: list[Event] = []
        self.committed: set[int] = set()
        self.aborted: set[int] = set()

    def read(self, txn: int, obj: Hashable) -> None:
        self.events.append(Event(txn, "r", obj))

    def write(self, txn: int, obj: Hashable) -> None:
        self.events.append(Event(txn, "w", obj))

    def commit(self, txn: int) -> None:
        self.committed.add(txn)

    def abort(self, txn: int) -> None:
        self.aborted.add(txn)

    def dump(self, path: str) -> None:
        """Write the history to `path` (msgpack), e.g. from a mount process for a test."""
        events = [(e.txn, e.op, ("B", *e.obj) if isinstance(e.obj, BlockRange)
                   else ("K", repr(e.obj))) for e in self.events]
        with open(path, "wb") as f:
            f.write(msgpack.packb(dict(events=events, committed=sorted(self.committed),
                                       aborted=sorted(self.aborted))))

    @classmethod
    def load(cls, path: str) -> "HistoryRecorder":
        """Read what `dump` wrote (caller-named keys come back as their repr)."""
        with open(path, "rb") as f:
            d = msgpack.unpackb(f.read())
        h = cls()
        for txn, op, obj in d["events"]:
            h.events.append(Event(txn, op, BlockRange(*obj[1:]) if obj[0] == "B" else obj[1]))
        h.committed.update(d["committed"])
        h.aborted.update(d["aborted"])
        return h


@dataclass
class SerializabilityResult:
    serializable: bool
    cycle: list[int] | None = None          # transactions on a cycle, in edge order
    order: list[int] = field(default_factory=list)   # a serial order, if serializable
    edges: int = 0
    transactions: int = 0

    def __bool__(self) -> bool:
        return self.serializable


def check_serializable(history: HistoryRecorder | Iterable,
                       committed: Iterable[int] | None = None) -> SerializabilityResult:
    """Check a history for conflict-serializability.

    `history` is a `HistoryRecorder` (only its committed transactions count) or an
    iterable of ``(txn, op, obj)`` with op "r"/"w" (all transactions count unless
    `committed` is given). Returns a `SerializabilityResult`; falsy when not serializable,
    with ``cycle`` naming the transactions on one cycle.
    """
    if isinstance(history, HistoryRecorder):
        events = history.events
        keep = history.committed if committed is None else set(committed)
    else:
        events = [Event(*e) for e in history]
        keep = None if committed is None else set(committed)
    if keep is not None:
        events = [e for e in events if e.txn in keep]
    txns = list(dict.fromkeys(e.txn for e in events))
    graph = _conflict_graph(events)
    cycle = _find_cycle(txns, graph)
    nedges = sum(len(v) for v in graph.values())
    if cycle:
        return SerializabilityResult(False, cycle, [], nedges, len(txns))
    return SerializabilityResult(True, None, _topo_order(txns, graph), nedges, len(txns))


def _conflict_graph(events: list[Event]) -> dict[int, set[int]]:
    """Edges from each conflicting earlier op to each later one.

    Per elementary segment (a piece of an object no recorded range boundary cuts) it
    keeps the last writer and the readers since; a new op gets edges from those only --
    earlier conflicts are implied through the last writer, so reachability (and every
    cycle) is the same as with all pairwise edges, at far lower cost.
    """
    cuts: dict[int, set[int]] = defaultdict(set)
    for e in events:
        if isinstance(e.obj, BlockRange):
            cuts[e.obj.block].update((e.obj.start, e.obj.end))
    bounds = {b: sorted(c) for b, c in cuts.items()}
    last_writer: dict[Hashable, int] = {}
    readers: dict[Hashable, set[int]] = defaultdict(set)
    graph: dict[int, set[int]] = defaultdict(set)
    for e in events:
        for seg in _segments(e.obj, bounds):
            w = last_writer.get(seg)
            if w is not None and w != e.txn:
                graph[w].add(e.txn)
            if e.op == "r":
                readers[seg].add(e.txn)
            else:
                for r in readers.pop(seg, ()):
                    if r != e.txn:
                        graph[r].add(e.txn)
                last_writer[seg] = e.txn
    return graph


def _segments(obj, bounds):
    if not isinstance(obj, BlockRange):
        return (("key", obj),)
    b = bounds[obj.block]
    i = bisect.bisect_left(b, obj.start)
    j = bisect.bisect_left(b, obj.end)
    return [("blk", obj.block, b[k]) for k in range(i, j)]


def _find_cycle(nodes: list[int], graph: dict[int, set[int]]) -> list[int] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(nodes, WHITE)
    for root in nodes:
        if color[root] != WHITE:
            continue
        path = [root]
        stack = [iter(sorted(graph.get(root, ())))]
        color[root] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                color[path.pop()] = BLACK
                continue
            c = color.get(nxt, WHITE)
            if c == GREY:
                return path[path.index(nxt):]
            if c == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _topo_order(nodes: list[int], graph: dict[int, set[int]]) -> list[int]:
    indeg = dict.fromkeys(nodes, 0)
    for a, succ in graph.items():
        for b in succ:
            indeg[b] += 1
    ready = [n for n in nodes if indeg[n] == 0]
    out = []
    while ready:
        n = ready.pop()
        out.append(n)
        for m in graph.get(n, ()):
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    return out
