"""The kernel's page cache of a file this mount wrote is kept across a close and a new
open, so that reading back what was just written does not reach the filesystem. (That
an open drops the pages once another mount changed the file is in
tests/replication/test_two_mounts.py.)"""

import ctypes
import ctypes.util
import mmap
import os

import pytest

from mounthelp import mounted_array

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident(path) -> float:
    """The share of `path`'s pages in the kernel's page cache after a new open and a
    stat (mincore of a mapping that nothing reads through)."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fstat(fd)                # the kernel asks the filesystem for fresh attributes
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory):
    with mounted_array(tmp_path_factory.mktemp("pagecache"), 4, "64M") as m:
        yield m.mnt


def test_what_this_mount_wrote_is_read_back_from_the_page_cache(mnt):
    import pyfuse3
    if not hasattr(pyfuse3.Operations, "enable_auto_inval_data"):
        pytest.skip("this pyfuse3 lets the kernel drop pages at every new mtime "
                    "(run tools/bootstrap.sh for the patched build)")
    data = os.urandom(4 * MiB)
    with open(mnt / "f", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert resident(mnt / "f") == 1.0
    # rewritten in place, and appended to, through other opens: still cached
    with open(mnt / "f", "r+b") as f:
        f.seek(MiB)
        f.write(b"y" * MiB)
    with open(mnt / "f", "ab") as f:
        f.write(b"z" * MiB)
    assert resident(mnt / "f") == 1.0
    with open(mnt / "f", "rb") as f:
        assert f.read() == data[:MiB] + b"y" * MiB + data[2 * MiB:] + b"z" * MiB
