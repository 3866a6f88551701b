"""Named crash points: `REPLFS_CRASH_AT=name[:n]` ends the process the n-th time it
passes `crash_point(name)` (default n=1), with `os._exit` -- no cleanup, no flush, as a
power loss would. Several points may be given, comma-separated.

Every layer marks its dangerous steps with `crash_point("layer.step")`; tests run a
workload in a child process with the variable set, then recover and check.
`REPLFS_CRASH_LOG=path` appends each point's name as it is passed (to list them).
"""

from __future__ import annotations

import os
import sys

CRASH_EXIT_CODE = 77

_targets: dict[str, int] | None = None
_counts: dict[str, int] = {}
_log: str | None = None


def _parse(spec: str | None = None) -> dict[str, int]:
    spec = os.environ.get("REPLFS_CRASH_AT", "") if spec is None else spec
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        out[name] = int(n) if n else 1
    return out


def reset() -> None:
    """Re-read the environment (for in-process tests that change it)."""
    global _targets
    _targets = None
    _counts.clear()


def arm(spec: str) -> None:
    """Add crash points at run time (`replfs fault crash-at`: a running server is told
    over its authenticated connection). Same syntax as the variable; counts start now."""
    global _targets, _log
    if _targets is None:
        _targets = _parse()
        _log = os.environ.get("REPLFS_CRASH_LOG") or None
    for name, n in _parse(spec).items():
        _targets[name] = n
        _counts[name] = 0


def crash_point(name: str) -> None:
    global _targets, _log
    if _targets is None:
        _targets = _parse()
        _log = os.environ.get("REPLFS_CRASH_LOG") or None
    if _log:
        with open(_log, "a") as f:
            f.write(name + "\n")
    if name in _targets:
        _counts[name] = _counts.get(name, 0) + 1
        if _counts[name] >= _targets[name]:
            sys.stderr.write(f"replfs: crash point {name} reached, exiting\n")
            sys.stderr.flush()
            os._exit(CRASH_EXIT_CODE)
