"""The mark of a replica that must take a full copy from its partner before it may
serve as primary: `DIR/S/needs-full-copy`.

A replica whose array lost blocks to the RAID-5 write hole (an unclean stop while
degraded, e.g. `kill -9` during a rebuild under writes) cannot know which of its
filesystem's blocks they were. Its server sets this mark, makes the array whole with
those blocks zeroed, and makes its filesystem anew -- again at every start while the
mark is there (tools/replica_array.py `open_replica_array`). It then holds no position,
so its partner sends it every allocated block. Until that transfer is forced it pings
with `copy=False`, and the view server never makes it primary (viewserver.py); a view
that makes it primary anyway is neither served nor acknowledged (server.py `_on_view`).
The mark is forced before anything changes, and removed once a position is forced
again (backup.py `_force_applied`)."""

from __future__ import annotations

import os

NAME = "needs-full-copy"


def marked(array_dir: str) -> bool:
    return os.path.exists(os.path.join(array_dir, NAME))


def mark(array_dir: str, why: str) -> None:
    """Set the mark (forced, with its directory entry)."""
    path = os.path.join(array_dir, NAME)
    with open(path, "w") as f:
        f.write(why + "\n")
        f.flush()
        os.fsync(f.fileno())
    _sync_dir(array_dir)


def clear(array_dir: str) -> None:
    try:
        os.remove(os.path.join(array_dir, NAME))
    except FileNotFoundError:
        return
    _sync_dir(array_dir)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
