"""Parsing sizes such as 64K, 256M, 1G (powers of 1024)."""

from replfs.errors import ReplfsError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B") if str(text).strip().upper() not in ("B",) else "1"
    num = t.rstrip("KMGT")
    unit = t[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ReplfsError(f"cannot read size {text!r}: use a number with K, M, G or T (e.g. 64M)") from None
    if value <= 0 or value != int(value):
        raise ReplfsError(f"size {text!r} must be a positive whole number of bytes")
    return int(value)
