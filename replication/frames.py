"""Frames: the message registry and the encoding of one frame.

Frame: a 4-byte big-endian length, then a msgpack array ``[tag, field1, field2, ...]``
(the message's fields in declaration order). A frame longer than `MAX_FRAME`, a body that
is not such an array, an unknown tag or a wrong field count raises `ProtocolError`.
Nothing is ever unpickled: the only msgpack extension type is `Attr` (the filesystem's
attribute record), packed as a fixed struct. The messages themselves, the channel and
authentication are in replication/wire.py, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import operator
import struct

import msgpack

from replfs.fs.core import Attr

MAX_FRAME = 8 * 2**20
_LEN = struct.Struct(">I")
_ATTR_EXT = 1
_ATTR_FIELDS = [f.name for f in dataclasses.fields(Attr)]
# an Attr travels as its fields packed in a fixed struct (a readdir reply holds one per
# entry: decoding them was most of a listing's cost on the client):
# ino mode nlink uid gid rdev size blocks atime_ns mtime_ns ctime_ns generation
_ATTR_STRUCT = struct.Struct("<QIIIIQQQqqqI")
assert len(_ATTR_FIELDS) == 12
_attr_values = operator.attrgetter(*_ATTR_FIELDS)


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message (or failed auth)."""


# ---------------------------------------------------------------- messages

MESSAGES: dict[str, type] = {}


def message(cls):
    """Register a message dataclass under its TAG."""
    cls = dataclasses.dataclass(cls)
    assert cls.TAG not in MESSAGES, cls.TAG
    MESSAGES[cls.TAG] = cls
    cls._fields = [f.name for f in dataclasses.fields(cls)]
    cls._required = sum(1 for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING)
    return cls


# ---------------------------------------------------------------- encoding

def _default(obj):
    if isinstance(obj, Attr):
        return msgpack.ExtType(_ATTR_EXT, _ATTR_STRUCT.pack(*_attr_values(obj)))
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _ext_hook(code: int, data: bytes):
    if code != _ATTR_EXT:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    if len(data) != _ATTR_STRUCT.size:
        raise ProtocolError("malformed Attr")
    return Attr(*_ATTR_STRUCT.unpack(data))


def pack_value(value) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def unpack_value(data: bytes):
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode(msg) -> bytes:
    body = pack_value([msg.TAG, *(getattr(msg, f) for f in msg._fields)])
    if len(body) > MAX_FRAME:
        raise ValueError(f"{msg.TAG} frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode(body: bytes):
    """The message in one frame body; ProtocolError if it is not one."""
    try:
        obj = unpack_value(body)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise ProtocolError("a frame must be [tag, fields...]")
    cls = MESSAGES.get(obj[0])
    if cls is None:
        raise ProtocolError(f"unknown message tag {obj[0]!r}")
    if not cls._required <= len(obj) - 1 <= len(cls._fields):
        raise ProtocolError(f"{obj[0]}: {len(obj) - 1} fields")
    return cls(*obj[1:])
