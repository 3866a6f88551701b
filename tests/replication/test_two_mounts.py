"""Two mounts of one cluster (two `replfs mount` client processes) see each other's
changes with close-to-open consistency: a file written and closed on one and then
opened on the other shows the new content, a new name is seen at once through a fresh
lookup (and, where the other mount cached its absence, once the kernel's entry timeout
has passed), a rename likewise."""

import errno
import os
import time

import pytest

from mounthelp import force_unmount
from replfs.fs.fuse_ops import ENTRY_TIMEOUT

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


class Second:
    """A second `replfs mount` of the running cluster, on its own mount point."""

    def __init__(self, running, mnt):
        self.running = running
        self.mnt = mnt
        self.name = "mount-b"

    def start(self) -> "Second":
        self.running.mount(self.mnt, self.name)
        return self

    def stop(self) -> None:
        try:
            force_unmount(self.mnt)
        finally:
            self.running.cluster.stop(self.name)
            force_unmount(self.mnt)


@pytest.fixture
def two(running, tmp_path):
    """(A, B): the running cluster's mount point and a second mount's."""
    b = Second(running, tmp_path / "mnt-b")
    try:
        b.start()
        yield running.mnt, b.mnt
    finally:
        b.stop()


def wait_until(pred, timeout: float, what: str) -> float:
    """Poll `pred()` until true; the seconds it took. Used only where what is awaited
    is the kernel's own cache timeout."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_or_none(path) -> bytes | None:
    try:
        return read(path)
    except OSError:
        return None


def exists(path) -> bool:
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False


def test_written_on_one_mount_opened_on_the_other(two):
    a, b = two
    write(a / "f", b"first version\n")
    assert read(b / "f") == b"first version\n"
    # B has read it (and holds its attributes and perhaps its pages): each open after
    # a close on A shows A's content, longer, shorter, or the same length
    for data in [b"second, longer version of the file\n", b"third\n", b"fourth\n",
                 b"x" * 100_000]:
        write(a / "f", data)
        assert read(b / "f") == data
        assert os.stat(b / "f").st_size == len(data)
    # and the other way round, through a file that stays open on A
    with open(a / "f", "rb"):
        write(b / "f", b"from B\n")
        assert read(a / "f") == b"from B\n"


def test_appends_on_both_mounts_in_turn(two):
    a, b = two
    expect = b""
    for i in range(6):
        mnt = a if i % 2 == 0 else b
        line = f"line {i} from {'AB'[i % 2]}\n".encode()
        with open(mnt / "log", "ab") as f:
            f.write(line)
        expect += line
        assert read(a / "log") == expect and read(b / "log") == expect


def test_new_file_seen_at_once_by_a_fresh_name(two):
    a, b = two
    (a / "d").mkdir()
    assert os.listdir(b / "d") == []
    write(a / "d" / "new", b"hello\n")
    assert read(b / "d" / "new") == b"hello\n"      # B never looked "new" up
    assert os.listdir(b / "d") == ["new"]           # readdir always asks


def test_new_file_seen_after_the_entry_timeout_where_its_absence_was_cached(two):
    a, b = two
    assert not exists(b / "late")           # B's kernel now caches "no such name"
    write(a / "late", b"late\n")
    took = wait_until(lambda: exists(b / "late"), ENTRY_TIMEOUT + 10,
                      "B sees the file A created")
    assert took < ENTRY_TIMEOUT + 5
    assert read(b / "late") == b"late\n"


def test_rename_on_one_mount_seen_on_the_other(two):
    a, b = two
    (a / "src").mkdir()
    (a / "dst").mkdir()
    write(a / "src" / "x", b"moving\n")
    assert read(b / "src" / "x") == b"moving\n"     # B caches the name "x"
    os.rename(a / "src" / "x", a / "dst" / "y")
    assert read(b / "dst" / "y") == b"moving\n"     # a fresh name: at once
    assert os.listdir(b / "src") == []
    wait_until(lambda: not exists(b / "src" / "x"), ENTRY_TIMEOUT + 10,
               "B's cached name of the moved file expires")
    # renamed over a file B has open-and-read: B's next open shows the new one
    write(a / "dst" / "z", b"old z\n")
    assert read(b / "dst" / "z") == b"old z\n"
    write(a / "src" / "z2", b"new z\n")
    os.rename(a / "src" / "z2", a / "dst" / "z")
    # B's cached name leads to the replaced inode, freed once A forgot it: B's open
    # gets ESTALE and the VFS looks the name up again, without waiting for the
    # entry timeout
    took = wait_until(lambda: read_or_none(b / "dst" / "z") == b"new z\n", ENTRY_TIMEOUT + 10,
                      "B sees the file renamed over one it had read")
    assert took < ENTRY_TIMEOUT / 2
    with pytest.raises(OSError) as exc:
        os.stat(b / "src" / "z2")
    assert exc.value.errno == errno.ENOENT


def test_own_writes_do_not_hide_a_change_the_other_mount_made_meanwhile(two):
    # A's kernel holds pages of f; B rewrites f (same length) while A has it open; A
    # then writes part of it and closes. A's pages of the part A did not write are of
    # the old version: A's next open must not keep them, although A's own write was
    # the last change (its pre-write version was B's, not the one A's pages are of)
    a, b = two
    write(a / "f", b"a" * 8192)
    assert read(a / "f") == b"a" * 8192
    with open(a / "f", "r+b") as fa:
        write(b / "f", b"b" * 8192)
        fa.write(b"A" * 100)
    assert read(a / "f") == b"A" * 100 + b"b" * 8092
    assert read(b / "f") == b"A" * 100 + b"b" * 8092
