"""The messages that travel between replfs processes: one dataclass each, registered
under its tag (replication/frames.py `message`), in a frame ``[tag, fields...]``.
replication/wire.py re-exports them: callers write `wire.OpRequest`, `wire.Ack`, ...

By conversation: authentication (Challenge, AuthResponse, AuthOk); the view service
(Ping, GetView, ViewReply); status, faults and crash points (StatusRequest/Reply,
SetFaults, FaultsApplied, CrashAt); client operations (OpRequest, OpReply, NotPrimary);
the primary's link to its backup (SyncStart, SyncPosition, Forward, Snapshot, SyncDone,
Flush, Renew, Ack, Refused); healing a block from the partner (HealRequest, HealReply).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from replfs.replication.frames import message




# authentication
@message
class Challenge:
    TAG: ClassVar[str] = "challenge"
    nonce: bytes


@message
class AuthResponse:
    TAG: ClassVar[str] = "auth"
    mac: bytes
    nonce: bytes
    name: str           # who is dialling (for log lines only)


@message
class AuthOk:
    TAG: ClassVar[str] = "auth-ok"
    mac: bytes


# view service
@message
class Ping:
    """A server's heartbeat: `view` is the view it acknowledges (0 right after a start);
    `boot` names the server process (a repeated ping 0 from the same process, e.g. after
    a lost reply, is not a restart); `copy` False: it holds no copy of its group's state
    yet (replication/needscopy.py), so it must not be made primary."""
    TAG: ClassVar[str] = "ping"
    group: int
    server: str
    view: int
    boot: str = ""
    copy: bool = True


@message
class GetView:
    TAG: ClassVar[str] = "get-view"
    group: int


@message
class ViewReply:
    TAG: ClassVar[str] = "view"
    group: int
    num: int
    primary: str
    backup: str
    acked: bool = False


@message
class StatusRequest:
    TAG: ClassVar[str] = "status?"


@message
class StatusReply:
    TAG: ClassVar[str] = "status"
    info: dict


@message
class Watch:
    """A standby view server (`name`) watches the active one: answered once with
    Watching, then nothing more is sent either way until one end goes
    (replication/viewstore.py `EtcdStore._watch`)."""
    TAG: ClassVar[str] = "watch"
    name: str


@message
class Watching:
    """The active view server `name` and the etcd lease it is active under."""
    TAG: ClassVar[str] = "watching"
    name: str
    lease: int


@message
class SetFaults:
    """`replfs fault partition | loss | heal`: the network faults `node` (the listener)
    enforces from now on, replacing the ones it had (the shape of the cluster's
    faults.json: `partitions` [[A, B], ...], `loss` {"A>B": {"request": p, "reply": q}}).
    Answered with FaultsApplied by the connection layer itself (see NetFaults)."""
    TAG: ClassVar[str] = "set-faults"
    generation: int
    partitions: list
    loss: dict
    node: str = ""


@message
class FaultsApplied:
    TAG: ClassVar[str] = "faults-applied"
    generation: int


@message
class CrashAt:
    """Arm crash points in a running server (`replfs fault crash-at`; crash.py syntax).
    Answered with StatusReply({"armed": spec})."""
    TAG: ClassVar[str] = "crash-at"
    spec: str


# client -> primary
@message
class OpRequest:
    """One filesystem operation. (client, lane, seq) identify it for at-most-once: a lane
    has at most one request outstanding, with increasing seq. `rid` matches the reply to
    this transmission on a multiplexed connection."""
    TAG: ClassVar[str] = "op"
    rid: int
    client: str
    lane: int
    seq: int
    method: str
    args: list
    kwargs: dict


@message
class OpReply:
    TAG: ClassVar[str] = "op-reply"
    rid: int
    value: Any = None
    errno: int = 0          # nonzero: FsError(errno, message)
    message: str = ""
    # an update's post-operation attributes: [Attr] of the inodes it changed in the
    # answering group (replication/postop.py)
    attrs: list = dataclasses.field(default_factory=list)


@message
class NotPrimary:
    """This server will not execute the request (not primary, not ready, or cut off):
    ask the view server and retry elsewhere."""
    TAG: ClassVar[str] = "not-primary"
    rid: int
    view: int
    reason: str


# primary -> backup
@message
class SyncStart:
    TAG: ClassVar[str] = "sync-start"
    view: int
    primary: str
    incarnation: str


@message
class SyncPosition:
    """The backup's replication position: it holds the primary `incarnation`'s state up
    to `lsn` ("" if it holds no consistent position). A backup that was a primary since
    also sends its own dirty map: `own_base` and the blocks `own_marks` (None and [] when
    it has none, or too many to send), for a transfer of the union
    (replication/dirtymap.py)."""
    TAG: ClassVar[str] = "sync-pos"
    incarnation: str
    lsn: int
    own_base: list | None = None
    own_marks: list = dataclasses.field(default_factory=list)


@message
class Forward:
    """Committed transactions of the primary, in commit order: [[lsn, [[block, offset,
    bytes], ...]], ...]."""
    TAG: ClassVar[str] = "forward"
    view: int
    primary: str
    records: list


@message
class Snapshot:
    """State transfer: whole blocks [[block, bytes], ...]; `sent`/`total` for progress."""
    TAG: ClassVar[str] = "snapshot"
    view: int
    primary: str
    blocks: list
    sent: int
    total: int
    kind: str = ""      # "incremental": the backup keeps its position until SyncDone


@message
class SyncDone:
    TAG: ClassVar[str] = "sync-done"
    view: int
    primary: str
    incarnation: str
    lsn: int


@message
class Flush:
    """fsync: answer once everything received so far is on the backup's stable storage."""
    TAG: ClassVar[str] = "flush"
    view: int
    primary: str
    lsn: int


@message
class Renew:
    """The primary's lease, renewed by its backup while the view server is silent: the
    backup answers `Ack` only while it is the backup of `view` under `primary`, and
    from then on does not serve as a primary itself for one lease (server.py)."""
    TAG: ClassVar[str] = "renew"
    view: int
    primary: str


@message
class Ack:
    """`lsn`: received (held in memory, applied in order); `durable`: the last LSN whose
    batch is applied and forced on the backup."""
    TAG: ClassVar[str] = "ack"
    lsn: int
    durable: int = 0


@message
class Refused:
    """The backup refuses a forward/sync: `view` is the view it knows."""
    TAG: ClassVar[str] = "refused"
    view: int
    reason: str


# replica -> its partner in the group (replication/heal.py)
@message
class HealRequest:
    """`block` cannot be read or rebuilt from the sender's array: the partner's copy,
    please. `view`/`primary`: the sender's view, as on the replication link."""
    TAG: ClassVar[str] = "heal?"
    view: int
    primary: str
    block: int


@message
class HealReply:
    """The partner's checksum-verified copy of `block`, or None (it has no good one, or
    it is not the sender's partner in that view: `reason`)."""
    TAG: ClassVar[str] = "heal"
    block: int
    data: bytes | None
    reason: str = ""
