"""Small helpers shared by every command that mounts or starts a daemon: is a directory
mounted, wait for a mount (failing fast when its process dies), unmount, and the
"ready pipe" by which a detached child tells its parent it is serving."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable

from replfs.errors import ReplfsError


def is_mounted(mnt) -> bool:
    mnt = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            # /proc/mounts escapes spaces and such as \\040 (octal)
            if len(parts) > 1 and parts[1].encode().decode("unicode_escape") == mnt:
                return True
    return False


def wait_mounted(mnt, alive: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Return once `mnt` is mounted; ReplfsError naming `what` if `alive()` turns False
    (the mount process died) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if not alive():
            raise ReplfsError(f"{what} exited before mounting {mnt}")
        if time.monotonic() > deadline:
            raise ReplfsError(f"{what}: {mnt} not mounted after {timeout:.0f} s")
        time.sleep(0.05)


def unmount(mnt) -> None:
    """Unmount `mnt` if mounted: cleanly, else lazily (a dead or busy mount)."""
    if is_mounted(mnt):
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if r.returncode != 0 and is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def spawn_ready(argv: list[str], logpath: str) -> int:
    """Start `replfs ARGV --ready-fd W` detached (its output to `logpath`) and return
    its pid once it writes "ready"; if it exits first, ReplfsError with one line that
    says why: the message it sent, else the last line it logged."""
    r, w = os.pipe()
    with open(logpath, "ab") as logf:
        start = logf.tell()
        proc = subprocess.Popen([sys.executable, "-m", "replfs.tools.cli", *argv,
                                 "--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as rf:
        msg = rf.read()
    if msg.startswith(b"ready"):
        return proc.pid
    rc = proc.wait()
    text = msg.decode(errors="replace").strip()
    if text.startswith("error:"):
        why = text[len("error:"):].strip()
    else:
        last = _last_line(logpath, start)
        why = (f"`replfs {argv[0]}` exited with code {rc} before it was ready"
               + (f": {last}" if last else ""))
    why = " ".join(why.split())
    raise ReplfsError(why if "(log " in why else f"{why} (log {logpath})")


def _last_line(path: str, start: int) -> str:
    """The last non-blank, unindented line written to `path` after offset `start`."""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, os.path.getsize(path) - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.strip() and not line[:1].isspace():
            return line.strip()[:300]
    return ""


def ready_failer(ready_fd: int | None) -> Callable[[str], None]:
    """A `fail(msg)` for a child started by `spawn_ready`: tell the parent, then raise."""
    def fail(msg: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, b"error: " + msg.encode())
            except OSError:
                pass
        raise ReplfsError(msg)
    return fail
