"""Model-based test (hypothesis), an fsx of sorts: random operations (fallocate in every
mode replfs supports among them) on the mount and on a reference directory on tmpfs; after every step both give the same result (or the same errno) and
the two trees are identical (types, modes, sizes, contents, link counts, symlinks,
xattrs)."""

import ctypes
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mounthelp import mounted_array

pytestmark = pytest.mark.timeout(600)

NAMES = st.sampled_from(["a", "b", "c", "dd"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
DATA = st.binary(max_size=9000)
OFFSETS = st.sampled_from([0, 1, 4095, 4096, 5000, 12288, 70000])
# fallocate(2) modes: 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, ZERO_RANGE|KEEP_SIZE
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
FALLOC_MODES = st.sampled_from([0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE,
                                ZERO_RANGE | KEEP_SIZE])
LENGTHS = st.sampled_from([1, 100, 4096, 9000, 20000])
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def zero_range_by_hand(fd: int, mode: int, offset: int, length: int) -> None:
    """What ZERO_RANGE does, for the reference on tmpfs (which has no ZERO_RANGE)."""
    end = offset + length
    if mode & KEEP_SIZE:
        end = min(end, os.fstat(fd).st_size)
    if end > offset:
        os.pwrite(fd, bytes(end - offset), offset)


def outcome(fn, *args):
    try:
        r = fn(*args)
        return ("ok", r)
    except OSError as e:
        return ("err", e.errno)


def snapshot(root: Path):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st_ = os.lstat(p)
            rel = str(p.relative_to(root))
            entry = [stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_nlink]
            if stat.S_ISREG(st_.st_mode):
                entry += [st_.st_size, p.read_bytes()]
            elif stat.S_ISLNK(st_.st_mode):
                entry.append(os.readlink(p))
            if not stat.S_ISLNK(st_.st_mode):
                entry.append(sorted((x, os.getxattr(p, x)) for x in os.listxattr(p)
                                    if x.startswith("user.")))
            out[rel] = entry
    return out


@pytest.fixture(scope="module")
def model_mount(tmp_path_factory):
    with mounted_array(tmp_path_factory.mktemp("model"), 3, "64M") as m:
        yield m


def test_model(model_mount):
    shm = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())

    class FsModel(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            tag = uuid.uuid4().hex[:8]
            self.real = model_mount.mnt / tag
            self.ref = shm / f"replfs-ref-{tag}"
            self.real.mkdir()
            self.ref.mkdir()

        def both(self, fn, *rel):
            a = outcome(fn, *[self.real / r if isinstance(r, str) else r for r in rel])
            b = outcome(fn, *[self.ref / r if isinstance(r, str) else r for r in rel])
            assert a == b, f"{fn.__name__}{rel}: replfs {a} vs tmpfs {b}"

        @rule(p=PATHS, data=DATA)
        def write_file(self, p, data):
            self.both(lambda path: path.write_bytes(data), p)

        @rule(p=PATHS, data=DATA, off=OFFSETS)
        def pwrite(self, p, data, off):
            def fn(path):
                fd = os.open(path, os.O_WRONLY)
                try:
                    return os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
            self.both(fn, p)

        @rule(p=PATHS, mode=FALLOC_MODES, off=OFFSETS, length=LENGTHS)
        def fallocate(self, p, mode, off, length):
            def fn(path):
                fd = os.open(path, os.O_WRONLY)
                try:
                    if mode & ZERO_RANGE and path.is_relative_to(self.ref):
                        zero_range_by_hand(fd, mode, off, length)
                    else:
                        fallocate(fd, mode, off, length)
                finally:
                    os.close(fd)
            self.both(fn, p)

        @rule(p=PATHS, size=OFFSETS)
        def truncate(self, p, size):
            self.both(lambda path: os.truncate(path, size), p)

        @rule(p=PATHS)
        def mkdir(self, p):
            self.both(os.mkdir, p)

        @rule(p=PATHS)
        def rmdir(self, p):
            self.both(os.rmdir, p)

        @rule(p=PATHS)
        def unlink(self, p):
            self.both(os.unlink, p)

        @rule(a=PATHS, b=PATHS)
        def rename(self, a, b):
            self.both(os.rename, a, b)

        @rule(a=PATHS, b=PATHS)
        def link(self, a, b):
            self.both(lambda x, y: os.link(x, y, follow_symlinks=False), a, b)

        @rule(dest=NAMES, p=PATHS)
        def symlink(self, dest, p):
            self.both(lambda path: os.symlink(dest, path), p)

        @rule(p=PATHS, mode=st.sampled_from([0o644, 0o600, 0o755, 0o1777]))
        def chmod(self, p, mode):
            self.both(lambda path: os.chmod(path, mode, follow_symlinks=False)
                      if not path.is_symlink() else None, p)

        @rule(p=PATHS, name=st.sampled_from(["user.x", "user.y"]), value=st.binary(max_size=64))
        def setxattr(self, p, name, value):
            self.both(lambda path: os.setxattr(path, name, value, follow_symlinks=False)
                      if not path.is_symlink() else None, p)

        @rule(p=PATHS)
        def read(self, p):
            self.both(lambda path: path.read_bytes(), p)

        @invariant()
        def same_tree(self):
            assert snapshot(self.real) == snapshot(self.ref)

        def teardown(self):
            shutil.rmtree(self.real, ignore_errors=True)
            shutil.rmtree(self.ref, ignore_errors=True)

    FsModel.TestCase.settings = settings(max_examples=int(os.environ.get("REPLFS_MODEL_EXAMPLES", "25")), stateful_step_count=30, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    FsModel.TestCase().runTest()
