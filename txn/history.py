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
import os
import time
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
    """Append-only log of read/write events plus commit/abort outcomes (in memory).

    With `stream=PATH` every event goes straight to that file instead (one msgpack array
    per event, with a CLOCK_MONOTONIC timestamp, written with os.write so that a process
    killed with -9 leaves everything it recorded): a replicated server records one file
    per incarnation, and `merge_streams` puts the files of a whole cluster together.
    Streams also carry `alias` (this transaction is one part of a distributed
    transaction named so) and `confirm` (its commit is known to have survived: the
    backup held it before anyone was answered)."""

    def __init__(self, stream: str | None = None):
        self.events: list[Event] = []
        self.committed: set[int] = set()
        self.aborted: set[int] = set()
        self._fd = None if stream is None else os.open(
            stream, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _emit(self, *rec) -> None:
        os.write(self._fd, msgpack.packb([time.monotonic_ns(), *rec]))

    def read(self, txn: int, obj: Hashable) -> None:
        if self._fd is not None:
            return self._emit("r", txn, _enc(obj))
        self.events.append(Event(txn, "r", obj))

    def write(self, txn: int, obj: Hashable) -> None:
        if self._fd is not None:
            return self._emit("w", txn, _enc(obj))
        self.events.append(Event(txn, "w", obj))

    def commit(self, txn: int) -> None:
        if self._fd is not None:
            return self._emit("c", txn)
        self.committed.add(txn)

    def abort(self, txn: int) -> None:
        if self._fd is not None:
            return self._emit("a", txn)
        self.aborted.add(txn)

    def alias(self, txn: int, name: str) -> None:
        if self._fd is not None:
            self._emit("alias", txn, name)

    def confirm(self, txn: int) -> None:
        if self._fd is not None:
            self._emit("confirm", txn)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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


def _enc(obj) -> list:
    return ["B", *obj] if isinstance(obj, BlockRange) else ["K", repr(obj)]


def merge_streams(sources: dict[int, list[str]]) -> tuple[list[Event], set, list[str]]:
    """Put the streamed histories of a cluster together: `sources` maps a namespace (a
    replica group: its objects are its own) to the stream files recorded in it.

    Transactions are named (file, txn), or by their alias (the parts of one distributed
    transaction become one transaction). A transaction counts as committed when it
    committed and, if it wrote anything, its commit was confirmed -- a commit the
    crash of its primary took away before the backup held it never happened. Events of
    one namespace are ordered by their timestamps; different namespaces share no
    object. Returns (events, committed names, problems): a distributed transaction that
    committed in one place and aborted in another is a problem (atomicity)."""
    events: list[Event] = []
    status: dict = defaultdict(set)
    wrote: set = set()
    for ns, paths in sorted(sources.items()):
        raw = []
        for path in paths:
            with open(path, "rb") as f:
                recs = list(msgpack.Unpacker(f, raw=False))
            alias = {r[2]: r[3] for r in recs if r[1] == "alias"}

            def name(t, path=path, alias=alias):
                return alias.get(t) or f"{os.path.basename(path)}:{t}"
            for r in recs:
                kind = r[1]
                if kind in ("r", "w"):
                    o = r[3]
                    obj = (BlockRange(o[1] + (ns << 40), o[2], o[3]) if o[0] == "B"
                           else ("K", ns, o[1]))
                    raw.append((r[0], Event(name(r[2]), kind, obj)))
                    if kind == "w":
                        wrote.add(name(r[2]))
                elif kind in ("c", "a", "confirm"):
                    status[name(r[2])].add(kind)
        raw.sort(key=lambda x: x[0])
        events.extend(e for _, e in raw)
    committed = {t for t, st in status.items()
                 if "c" in st and ("confirm" in st or t not in wrote)}
    problems = [f"{t} committed in one group and aborted in another" for t, st in status.items()
                if "c" in st and "a" in st and "confirm" in st]
    return events, committed, problems


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
