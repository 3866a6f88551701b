"""Helpers for tests that mount a real replfs: start the mount process, wait for it
(failing fast if it dies), and always unmount and stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from replfs.tools.mountpoints import is_mounted

REPO = Path(__file__).resolve().parent.parent
REPLFS = [sys.executable, "-m", "replfs.tools.cli"]


def replfs(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([*REPLFS, *map(str, args)], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"replfs {' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


def wait_for_mount(proc: subprocess.Popen, mnt, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if proc.poll() is not None:
            raise AssertionError(f"mount process exited with {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise AssertionError(f"{mnt} not mounted after {timeout} s")
        time.sleep(0.05)


def force_unmount(mnt) -> None:
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


class Mount:
    """A `replfs mount --local DIR MNT` in a child process."""

    def __init__(self, data, mnt, env=None, allow_other=False, args=()):
        self.data = Path(data)
        self.args = list(args)      # more flags of `replfs mount --local`
        self.mnt = Path(mnt)
        self.env = env
        self.allow_other = allow_other
        self.proc: subprocess.Popen | None = None
        self.log = self.data / "mount-test.log"

    def start(self, env=None) -> "Mount":
        self.mnt.mkdir(parents=True, exist_ok=True)
        e = dict(os.environ)
        e.update(self.env or {})
        e.update(env or {})
        with open(self.log, "ab") as logf:
            extra = (["--allow-other"] if self.allow_other else []) + self.args
            self.proc = subprocess.Popen([*REPLFS, "mount", "--local", str(self.data), str(self.mnt),
                                          *extra],
                                         stdout=logf, stderr=logf, env=e, start_new_session=True)
        try:
            wait_for_mount(self.proc, self.mnt)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log ends:\n{self.logtext()[-3000:]}") from None
        return self

    def kill9(self) -> None:
        """Power loss for the mount process: kill -9, then detach the dead mount."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        force_unmount(self.mnt)

    def stop(self) -> int | None:
        """Unmount cleanly and wait for the process; always leaves nothing behind."""
        try:
            if self.proc and self.proc.poll() is None and is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, timeout=30)
            if self.proc:
                try:
                    return self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    return None
        finally:
            force_unmount(self.mnt)
            if self.proc and self.proc.poll() is None:
                self.proc.kill()

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def mounted_array(base: Path, disks: int = 4, size: str = "32M"):
    """A new array in base/data, mounted (--local) on base/mnt for the `with` block."""
    replfs("mkfs", base / "data", "--disks", str(disks), "--size", size)
    m = Mount(base / "data", base / "mnt")
    try:
        m.start()
        yield m
    finally:
        m.stop()
