"""The small files an array keeps in its directory, beside (or instead of) the images.

- `array.json`: the config: array uuid, disk count, chunk, and the member paths (image
  files in DIR, or any path such as /dev/loop3), in member order.
- `bitmap`: the durable copy of the write-intent bitmap (see bitmap.py).
- `state.json`: scrub progress and last result, for `status` in other processes.
- `array.lock`: flock'ed by the process that has the array open (holds its pid).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading

from .errors import RaidError

CONFIG_NAME = "array.json"
STATE_NAME = "state.json"
LOCK_NAME = "array.lock"
BITMAP_NAME = "bitmap"


def resolve(dirpath: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(dirpath, p)


def load_config(dirpath: str) -> dict:
    path = os.path.join(dirpath, CONFIG_NAME)
    if not os.path.isdir(dirpath):
        raise RaidError(f"{dirpath}: no such directory; create an array with "
                        f"`replfs raid create {dirpath} --disks N --size SIZE`")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise RaidError(f"{dirpath}: no array here ({CONFIG_NAME} missing); create one with "
                        f"`replfs raid create {dirpath} --disks N --size SIZE`") from None
    except (OSError, ValueError) as exc:
        raise RaidError(f"{path}: cannot read the array config ({exc}); restore it or "
                        f"recreate it from the disks' superblocks") from None
    for key in ("uuid", "ndisks", "chunk", "disks"):
        if key not in cfg:
            raise RaidError(f"{path}: array config lacks {key!r}; restore it")
    return cfg


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state(dirpath: str) -> dict:
    try:
        with open(os.path.join(dirpath, STATE_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


_state_lock = threading.Lock()


def update_state(dirpath: str, **kw) -> None:
    """Set keys of the state file. A scrub's step (in a worker thread) and a background
    job's record (raid/jobs.py, on the trio thread) both write it: one at a time, or
    one would undo the other's keys (or both write the same temporary file)."""
    with _state_lock:
        st = read_state(dirpath)
        st.update(kw)
        try:
            write_json(os.path.join(dirpath, STATE_NAME), st)
        except OSError:
            pass


def lock_dir(dirpath: str) -> int:
    fd = os.open(os.path.join(dirpath, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise RaidError(f"{dirpath}: the array is in use by another process"
                        f"{' (pid ' + holder + ')' if holder else ''}; stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
