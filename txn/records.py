"""Log records and their on-disk framing.

Every record is framed as::

    crc32c u32 | body length u32 | lsn u64 | epoch u32 | body (msgpack array)

little-endian, 20 header bytes. The CRC covers the log id (a random 64-bit number chosen
at format time, stored in the log header), the last 16 header bytes and the body, so a
record from an earlier format of the same region never validates. The LSN is the
record's byte offset in the (conceptually infinite) log; a record left over from an
earlier lap of the circular region carries another LSN and is rejected. The epoch is
bumped by every recovery: records written after a recovery have a higher epoch, so stale
records of the crashed run that lie beyond the recovered end never validate again.

Body: ``[type, *fields]``; types and fields are the dataclasses below.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import crc32c
import msgpack

FRAME = struct.Struct("<IIQI")  # crc, length, lsn, epoch
FRAME_SIZE = FRAME.size
# Upper bound of the msgpack overhead of an UPDATE/CLR besides its byte strings.
RECORD_OVERHEAD = 64


class RecType(IntEnum):
    UPDATE = 1
    CLR = 2
    COMMIT = 3
    ABORT = 4
    CHECKPOINT = 5
    PREPARE = 6
    DECISION = 7
    FORGET = 8
    REDO = 9


@dataclass(frozen=True, slots=True)
class Update:
    """Byte-range update of `block` at `offset`: `new` replaces `old`.

    `old` is None for a redo-only update (``write(undo=False)``): never undone."""
    txn: int
    block: int
    offset: int
    new: bytes
    old: bytes | None
    type = RecType.UPDATE


@dataclass(frozen=True, slots=True)
class Clr:
    """Compensation: undoing the UPDATE at LSN `compensates` wrote `new` (its old bytes).

    Redo-only; recovery never undoes a CLR and skips the update it compensates."""
    txn: int
    block: int
    offset: int
    new: bytes
    compensates: int
    type = RecType.CLR


@dataclass(frozen=True, slots=True)
class Commit:
    txn: int
    payload: Any = None
    type = RecType.COMMIT


@dataclass(frozen=True, slots=True)
class Abort:
    txn: int
    type = RecType.ABORT


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Every page dirtied before `redo_lsn` was on stable storage when this was logged.

    `decisions` carries the coordinator decisions not yet forgotten across truncation;
    `active` is informational ((txn, first lsn) of transactions live at the time)."""
    redo_lsn: int
    next_txn: int
    active: list = field(default_factory=list)
    decisions: list = field(default_factory=list)
    type = RecType.CHECKPOINT


@dataclass(frozen=True, slots=True)
class Prepare:
    """2PC participant vote YES: `locks` are the X-locked keys, re-taken by recovery."""
    txn: int
    payload: Any
    locks: list
    type = RecType.PREPARE


@dataclass(frozen=True, slots=True)
class Decision:
    """2PC coordinator's durable decision for global transaction `gtid`."""
    gtid: Any
    commit: bool
    participants: list
    type = RecType.DECISION


@dataclass(frozen=True, slots=True)
class Forget:
    """The coordinator no longer needs the decision for `gtid` (all participants acked)."""
    gtid: Any
    type = RecType.FORGET


@dataclass(frozen=True, slots=True)
class Redo:
    """A committed batch of after-images, ``[[block, offset, data], ...]``, in one record
    and outside any transaction (`TxnManager.apply_redo`: a backup applying its
    primary's commits). The frame's checksum makes it whole or absent; recovery redoes
    it and never undoes it."""
    changes: list
    type = RecType.REDO


_CLASSES = {cls.type: cls for cls in (Update, Clr, Commit, Abort, Checkpoint, Prepare,
                                      Decision, Forget, Redo)}
Record = Update | Clr | Commit | Abort | Checkpoint | Prepare | Decision | Forget | Redo


def tuplify(x: Any) -> Any:
    """msgpack turns tuples into lists; lock keys and gtids are tuples again after decode."""
    if isinstance(x, list):
        return tuple(tuplify(i) for i in x)
    return x


_packer = msgpack.Packer(use_bin_type=True)
_FIELDS = {cls: (int(cls.type), cls.__slots__) for cls in _CLASSES.values()}


def encode_body(rec: Record) -> bytes:
    if type(rec) is Update:     # the hot one
        return _packer.pack((1, rec.txn, rec.block, rec.offset, rec.new, rec.old))
    if type(rec) is Commit:
        return _packer.pack((3, rec.txn, rec.payload))
    code, names = _FIELDS[type(rec)]
    return _packer.pack([code, *(getattr(rec, f) for f in names)])


def decode_body(body: bytes) -> Record:
    items = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=False)
    cls = _CLASSES[RecType(items[0])]
    rec = cls(*items[1:])
    if cls is Prepare:
        rec = Prepare(rec.txn, rec.payload, [tuplify(k) for k in rec.locks])
    elif cls is Decision:
        rec = Decision(tuplify(rec.gtid), rec.commit, [tuplify(p) for p in rec.participants])
    elif cls is Forget:
        rec = Forget(tuplify(rec.gtid))
    elif cls is Checkpoint:
        rec = Checkpoint(rec.redo_lsn, rec.next_txn, rec.active,
                         [[tuplify(g), c, [tuplify(p) for p in ps]] for g, c, ps in rec.decisions])
    return rec


_REST = struct.Struct("<IQI")   # the framed header after the crc: length, lsn, epoch
_CRC = struct.Struct("<I")


def frame(rec: Record, lsn: int, epoch: int, log_id: int) -> bytes:
    body = encode_body(rec)
    rest = _REST.pack(len(body), lsn, epoch)
    crc = crc32c.crc32c(body, crc32c.crc32c(rest, _seed(log_id)))
    return _CRC.pack(crc) + rest + body


def check_frame(head: bytes, body: bytes, log_id: int) -> bool:
    crc = FRAME.unpack(head)[0]
    return crc32c.crc32c(body, crc32c.crc32c(head[4:], _seed(log_id))) == crc


@functools.lru_cache(maxsize=8)
def _seed(log_id: int) -> int:
    return crc32c.crc32c(log_id.to_bytes(8, "little"))
