"""POSIX behaviour through a real FUSE mount (`replfs mount --local` in a child
process), one behaviour per test over a shared mount."""

import ctypes
import errno
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mounthelp import Mount, replfs

pytestmark = pytest.mark.timeout(120)

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


def renameat2(a, b, flags):
    r = libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    base = tmp_path_factory.mktemp("replfs")
    data = base / "data"
    # the mount point must be reachable by other users for the permission tests
    # (pytest's own tmp folders are 0700), and the mount lets them in (allow_other)
    mnt = Path(tempfile.mkdtemp(prefix="replfs-mnt-"))
    os.chmod(mnt, 0o755)
    replfs("mkfs", data, "--disks", "4", "--size", "96M")
    m = Mount(data, mnt, allow_other=True)
    try:
        m.start()
        yield m
    finally:
        m.stop()
        shutil.rmtree(mnt, ignore_errors=True)


@pytest.fixture
def d(mount, request):
    p = mount.mnt / request.node.name
    p.mkdir()
    return p


def test_files_read_write_append(d):
    f = d / "a.txt"
    f.write_bytes(b"hello\n")
    with open(f, "ab") as fh:
        fh.write(b"world\n")
    assert f.read_bytes() == b"hello\nworld\n"
    assert f.stat().st_size == 12
    big = os.urandom(3 * 2**20 + 17)
    (d / "big").write_bytes(big)
    assert (d / "big").read_bytes() == big
    assert sorted(os.listdir(d)) == ["a.txt", "big"]


def test_mkdir_rmdir_nlink(d):
    (d / "x" / "y").mkdir(parents=True)
    assert os.stat(d / "x").st_nlink == 3
    with pytest.raises(OSError) as e:
        os.rmdir(d / "x")
    assert e.value.errno == errno.ENOTEMPTY
    os.rmdir(d / "x" / "y")
    os.rmdir(d / "x")
    assert os.stat(d).st_nlink == 2


def test_hard_links_and_symlinks(d):
    (d / "f").write_text("x")
    os.link(d / "f", d / "g")
    assert os.stat(d / "f").st_nlink == 2
    assert os.stat(d / "f").st_ino == os.stat(d / "g").st_ino
    os.symlink("f", d / "s")
    assert os.readlink(d / "s") == "f"
    assert (d / "s").read_text() == "x"
    os.unlink(d / "f")
    assert os.stat(d / "g").st_nlink == 1


def test_rename_rules(d):
    (d / "a").write_text("a")
    (d / "b").write_text("b")
    renameat2(d / "a", d / "b", 2)          # RENAME_EXCHANGE
    assert (d / "a").read_text() == "b" and (d / "b").read_text() == "a"
    with pytest.raises(OSError) as e:
        renameat2(d / "a", d / "b", 1)      # RENAME_NOREPLACE
    assert e.value.errno == errno.EEXIST
    (d / "dir" / "sub").mkdir(parents=True)
    with pytest.raises(OSError) as e:
        os.rename(d / "dir", d / "dir" / "sub" / "x")
    assert e.value.errno == errno.EINVAL
    (d / "full").mkdir()
    (d / "full" / "x").write_text("")
    with pytest.raises(OSError) as e:
        os.rename(d / "dir", d / "full")
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    os.rename(d / "a", d / "dir" / "moved")
    assert (d / "dir" / "moved").read_text() == "b"


def test_sparse_and_large_files(d):
    p = d / "sparse"
    with open(p, "wb") as f:
        f.seek(2**40 - 5)
        f.write(b"tail")
    st = os.stat(p)
    assert st.st_size == 2**40 - 1
    assert st.st_blocks * 512 <= 64 * 4096
    with open(p, "rb") as f:
        f.seek(2**39)
        assert f.read(4096) == bytes(4096)
        f.seek(2**40 - 5)
        assert f.read() == b"tail"
    os.truncate(p, 10)
    assert os.stat(p).st_size == 10
    with pytest.raises(OSError) as e:
        os.truncate(p, 2**45)
    assert e.value.errno == errno.EFBIG


def test_timestamps(d):
    p = d / "t"
    p.write_text("x")
    os.utime(p, ns=(10**18, 2 * 10**18))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 2 * 10**18)
    before = time.time_ns()
    os.utime(p)                              # "now"
    st = os.stat(p)
    assert st.st_mtime_ns >= before - 10**9
    m0 = os.stat(d).st_mtime_ns
    time.sleep(0.01)                       # let the clock move past m0 (not a wait)
    (d / "new").write_text("")
    assert os.stat(d).st_mtime_ns > m0


def test_xattrs(d):
    p = d / "x"
    p.write_text("")
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    assert "user.color" in os.listxattr(p)
    os.removexattr(p, "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(p, "user.color")
    assert e.value.errno == errno.ENODATA


def test_name_too_long(d):
    with pytest.raises(OSError) as e:
        (d / ("n" * 256)).write_text("")
    assert e.value.errno == errno.ENAMETOOLONG
    (d / ("n" * 255)).write_text("ok")


def test_unlinked_open_file_lives_until_close(d, mount):
    p = d / "open"
    free0 = os.statvfs(mount.mnt).f_bfree
    with open(p, "w+b") as f:
        f.write(b"z" * 2**20)
        f.flush()
        os.unlink(p)
        assert not p.exists()
        f.seek(0)
        assert f.read() == b"z" * 2**20
    deadline = time.monotonic() + 10
    while os.statvfs(mount.mnt).f_bfree < free0 - 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.statvfs(mount.mnt).f_bfree >= free0 - 8



# ---------------------------------------------------------------- the page cache across opens
PAGE = 4096
PROT_READ, MAP_SHARED = 1, 1
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_pages(fd: int, size: int) -> int:
    """How many of the first `size` bytes' pages of open file `fd` the kernel's page cache
    holds (mincore of a mapping, which reads nothing)."""
    addr = libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(b & 1 for b in vec.raw)
    finally:
        libc.munmap(addr, size)


def cached_after_open(path, size: int) -> int:
    """Open `path` (the open decides whether the kernel keeps its pages) and count them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return cached_pages(fd, size)
    finally:
        os.close(fd)


def test_page_cache_kept_across_opens_only_while_unchanged(d):
    f, size = d / "f", 16 * PAGE
    f.write_bytes(b"a" * size)
    assert f.read_bytes() == b"a" * size            # the kernel now holds every page
    assert cached_after_open(f, size) == 16          # unchanged: an open keeps them
    assert cached_after_open(f, size) == 16
    os.chmod(f, 0o600)                               # ctime: a new version, as far as
    assert cached_after_open(f, size) == 0           # an open can tell: pages dropped
    assert f.read_bytes() == b"a" * size
    with open(f, "r+b") as fh:                       # a write through the mount: the
        fh.write(b"b")                               # kernel's pages took it, and the
    assert cached_after_open(f, size) == 16          # version it made is the open's own
    assert f.read_bytes() == b"b" + b"a" * (size - 1)
    assert cached_after_open(f, size) == 16


def test_what_this_mount_wrote_is_read_back_from_the_page_cache(d):
    import pyfuse3
    if not hasattr(pyfuse3.Operations, "enable_auto_inval_data"):
        pytest.skip("this pyfuse3 lets the kernel drop pages at every new mtime "
                    "(tools/bootstrap.sh builds the patched one)")
    f, size = d / "f", 256 * PAGE
    data = os.urandom(size)
    with open(f, "wb") as fh:
        fh.write(data)
        os.fsync(fh.fileno())
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fstat(fd)                # fresh attributes, a new mtime among them
        assert cached_pages(fd, size) == 256
    finally:
        os.close(fd)
    with open(f, "r+b") as fh:      # rewritten in part, then appended to: still cached
        fh.seek(PAGE)
        fh.write(b"y" * PAGE)
    with open(f, "ab") as fh:
        fh.write(b"z" * PAGE)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fstat(fd)
        assert cached_pages(fd, size + PAGE) == 257
        want = data[:PAGE] + b"y" * PAGE + data[2 * PAGE:] + b"z" * PAGE
        assert os.read(fd, size + PAGE) == want
    finally:
        os.close(fd)


def test_reopen_reads_every_change_made_through_the_mount(d):
    f, size = d / "f", 10_000
    data = bytearray(os.urandom(size))
    f.write_bytes(data)
    with open(f, "rb") as reader:                    # a handle open throughout
        assert reader.read() == data
        for _ in range(2):                           # pages kept: still the content
            assert f.read_bytes() == data
        with open(f, "r+b") as fh:                   # overwritten in place, same size
            fh.seek(5000)
            fh.write(b"X" * 100)
        data[5000:5100] = b"X" * 100
        assert f.read_bytes() == data
        with open(f, "ab") as fh:                    # appended
            fh.write(b"tail")
        data += b"tail"
        assert f.read_bytes() == data
        os.truncate(f, 3000)                         # shortened by name, no handle
        del data[3000:]
        assert f.read_bytes() == data
        os.truncate(f, 6000)                         # lengthened: zeros, not old bytes
        data += bytes(3000)
        assert f.read_bytes() == data
        reader.seek(0)
        assert reader.read() == data
    f.write_bytes(b"new")                            # O_TRUNC
    assert f.read_bytes() == b"new"
    (d / "g").write_bytes(b"replaced by a rename")   # another inode under the name
    os.rename(d / "g", f)
    assert f.read_bytes() == b"replaced by a rename"

def test_permissions_as_non_root(d):
    os.chmod(d, 0o755)
    (d / "mine").write_text("root's")
    os.chmod(d / "mine", 0o644)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run(nobody + ["ls", d], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr          # the user can get in at all
    r = subprocess.run(nobody + ["sh", "-c", f"echo x > {d}/new"], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run(nobody + ["sh", "-c", f"echo x >> {d}/mine"], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run(nobody + ["cat", f"{d}/mine"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "root's"
    (d / "open").mkdir(mode=0o777)
    os.chmod(d / "open", 0o777)
    r = subprocess.run(nobody + ["sh", "-c", f"echo hi > {d}/open/theirs"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    st = os.stat(d / "open" / "theirs")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    os.chmod(d / "mine", 0o600)
    r = subprocess.run(nobody + ["cat", f"{d}/mine"], capture_output=True, text=True)
    assert r.returncode != 0


def test_special_files(d):
    os.mkfifo(d / "fifo")
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(d / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_statfs(mount):
    st = os.statvfs(mount.mnt)
    assert st.f_bsize == 4096 and st.f_blocks > st.f_bfree > 0 and st.f_namemax == 255


def test_tar_cp_diff_rm(d, tmp_path):
    src = tmp_path / "src"
    for i in range(40):
        sub = src / f"dir{i}"
        sub.mkdir(parents=True)
        for j in range(50):
            (sub / f"file{j}.txt").write_bytes(os.urandom(j * 37))
    (src / "dir0" / "link").symlink_to("file1.txt")
    tarball = tmp_path / "src.tar"
    subprocess.run(["tar", "-C", src, "-cf", tarball, "."], check=True)
    (d / "x").mkdir()
    subprocess.run(["tar", "-C", d / "x", "-xf", tarball], check=True)
    subprocess.run(["diff", "-r", src, d / "x"], check=True)
    subprocess.run(["cp", "-a", d / "x", d / "y"], check=True)
    subprocess.run(["diff", "-r", src, d / "y"], check=True)
    subprocess.run(["rm", "-rf", d / "x", d / "y"], check=True)
    assert os.listdir(d) == []


def test_git(d):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e", HOME=str(d))
    run = lambda *a: subprocess.run(a, cwd=d, env=env, check=True, capture_output=True, text=True)
    run("git", "init", "-q")
    for i in range(20):
        (d / f"f{i}.py").write_text(f"print({i})\n" * (i + 1))
    run("git", "add", ".")
    run("git", "commit", "-qm", "first")
    (d / "f3.py").write_text("changed\n")
    run("git", "commit", "-qam", "second")
    assert run("git", "log", "--oneline").stdout.count("\n") == 2
    assert run("git", "fsck").returncode == 0
    assert run("git", "status", "--porcelain").stdout == ""


def test_sqlite(d):
    db = sqlite3.connect(d / "t.db")
    db.execute("create table t (k integer primary key, v text)")
    with db:
        db.executemany("insert into t values (?, ?)", [(i, "v%d" % i * 10) for i in range(2000)])
    assert db.execute("select count(*), sum(k) from t").fetchone() == (2000, sum(range(2000)))
    db.execute("delete from t where k % 2 = 0")
    db.commit()
    assert db.execute("select count(*) from t").fetchone() == (1000,)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()


def test_listing_larger_than_the_kernels_buffer(d):
    """Long names fill the kernel's readdir buffer after a few entries: what a batch had
    beyond them is handed over at the next call (fs/fuse_ops.py `_Listing`), and the
    listing has every name once, also after the directory changed in between."""
    names = {f"{i:04d}-" + "n" * 200 for i in range(300)}
    for n in names:
        (d / n).touch()
    for _ in range(2):
        got = os.listdir(d)
        assert len(got) == len(names) and set(got) == names
    with os.scandir(d) as it:
        first = [next(it).name for _ in range(10)]
        (d / ("new-" + "m" * 200)).touch()
        (d / sorted(names - set(first))[0]).unlink()
        rest = [e.name for e in it]
    seen = first + rest
    assert len(seen) == len(set(seen))              # no entry twice
    assert set(first) <= names
    assert set(os.listdir(d)) == (names - {sorted(names - set(first))[0]}) | {"new-" + "m" * 200}
