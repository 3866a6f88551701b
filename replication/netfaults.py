"""The network faults a process injects into its own connections (`NetFaults`), and the
one instance each process holds (`FAULTS`); replication/wire.py's `Channel` consults it
for every frame."""

from __future__ import annotations

import random
import weakref
from typing import TYPE_CHECKING

from replfs.replication.config import CLIENT, parse_faults

if TYPE_CHECKING:
    from replfs.replication.wire import Channel


class NetFaults:
    """The network faults this process injects into its own connections, between its node
    (`node`: "vs", "s0", ...) and each peer named at authentication:

    - a *partition* {A, B}: every frame between A and B is dropped, both ways. Open
      connections stay open and carry nothing; a new one is accepted, but the handshake
      never completes (the listener keeps reading and dropping, the dialler waits).
      Lifting the partition closes every connection across it, so that peers reconnect
      at once.
    - *loss* A>B, probability p: each whole frame from A to B is dropped with probability
      p -- never a frame of the authentication handshake.

    Both ends of a pair that listen (the view server, the servers) hold the faults: a
    partition is enforced by both, harmlessly; loss once per direction, by the
    receiver -- except towards the client, which cannot be told (a FUSE mount has no
    listener): its peer drops the frames bound for it before sending them. A process
    gets its faults from `update` (at start, from the cluster's faults.json) and from
    `SetFaults` on any authenticated connection to its listener, which the connection
    layer answers itself with `FaultsApplied` (see `Channel.receive`)."""

    def __init__(self, node: str = "", seed: int | None = None):
        self.node = node                # this process's node ("" while not known)
        self.generation = 0
        self._cut: set[frozenset] = set()
        self._loss: dict[tuple[str, str], float] = {}     # (src, dst) -> drop probability
        self._rng = random.Random(seed)
        self._channels: weakref.WeakSet = weakref.WeakSet()   # authenticated, or held
        self.stats = dict(dropped_in=0, dropped_out=0, held=0)

    def __repr__(self) -> str:
        cuts = ", ".join("<->".join(sorted(p)) for p in self._cut) or "none"
        loss = ", ".join(f"{a}>{b} {p:.0%}" for (a, b), p in self._loss.items() if p) or "none"
        return f"generation {self.generation}: partitions {cuts}; loss {loss}"

    def cut(self, a: str, b: str) -> bool:
        return bool(self._cut) and frozenset((a, b)) in self._cut

    def update(self, generation: int, partitions, loss, node: str = "") -> list["Channel"]:
        """Replace every fault by these (faults.json's shape, see SetFaults); a process
        that does not know its node yet takes `node`. Returns the open connections across
        a partition now lifted, for the caller to close. ValueError if malformed."""
        cut, lossmap = parse_faults(generation, partitions, loss)
        if node and not self.node:
            self.node = node
        lifted = [ch for ch in list(self._channels)
                  if ch.node and self.cut(ch.local, ch.node)
                  and frozenset((ch.local, ch.node)) not in cut]
        self.generation, self._cut, self._loss = generation, cut, lossmap
        return lifted

    def drop_incoming(self, local: str, peer: str) -> bool:
        """Whether to drop the frame `local` just received from `peer`."""
        if self.cut(local, peer):
            self.stats["dropped_in"] += 1
            return True
        p = self._loss.get((peer, local)) if self._loss else None
        if p and self._rng.random() < p:
            self.stats["dropped_in"] += 1
            return True
        return False

    def drop_outgoing(self, local: str, peer: str) -> bool:
        """Whether to drop a frame `local` is about to send to `peer` (loss only towards
        the client: any other peer drops on receipt)."""
        if self.cut(local, peer):
            self.stats["dropped_out"] += 1
            return True
        p = self._loss.get((local, peer)) if self._loss and peer == CLIENT else None
        if p and self._rng.random() < p:
            self.stats["dropped_out"] += 1
            return True
        return False

    def track(self, ch: "Channel") -> None:
        self._channels.add(ch)


FAULTS = NetFaults()        # this process's: set up at start (`replfs server`, `viewserver`)
