"""Everyday tools on a replicated mount (issue 12): copies that preserve permissions give
the modes the machine's own filesystem gives, and `df` promises no space that a file
cannot get."""

import errno
import json
import os
import subprocess

import psutil
import pytest

from clusterhelp import Running
from fallocatehelp import check_fallocate_modes, fallocate
from mounthelp import replfs
from replfs.tools.cluster import Cluster
from treemodes import acl_disagreements, compare_tools, make_tree

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("everyday")
    r = Running(base / "cluster", base / "mnt")
    try:
        r.start()
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def copied(cluster, tmp_path_factory):
    """The tree copied by every tool into the mount and into a reference directory."""
    base = tmp_path_factory.mktemp("trees")
    src = make_tree(base / "src")
    ref = base / "ref"
    ref.mkdir()
    dst = cluster.mnt / "copies"
    dst.mkdir()
    diffs, failures = compare_tools(src, dst, ref)
    return dst, ref, diffs, failures


def test_tools_give_the_modes_ext4_gives(copied):
    _dst, _ref, diffs, _failures = copied
    assert diffs == {}


def test_tools_succeed(copied):
    _dst, _ref, _diffs, failures = copied
    assert failures == {}


def test_getfacl_agrees_with_ls(copied):
    dst, _ref, _diffs, _failures = copied
    assert acl_disagreements(dst) == []


# a valid ACL (user::rw- group::r-- other::r--) as setfacl sends it
ACL_VALUE = bytes.fromhex("02000000" "0100060000000000" "0400040000000000" "2000040000000000")


def test_acl_xattrs_refused(cluster):
    d = cluster.mnt / "acl-probe"
    d.mkdir()                   # a directory: it may have a default ACL too
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError) as e:
            os.getxattr(d, name)
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            os.setxattr(d, name, ACL_VALUE)
        assert e.value.errno == errno.EOPNOTSUPP
    os.setxattr(d, "user.kept", b"1")       # other xattrs still work
    assert os.getxattr(d, "user.kept") == b"1"
    assert os.listxattr(d) == ["user.kept"]


def test_real_acl_is_refused_and_mode_kept(cluster, tmp_path):
    """A file with a real ACL: cp -a says it cannot keep it (as onto any filesystem
    without ACLs), and the copy's mode is the source's mode, which ls and getfacl agree on."""
    src = tmp_path / "withacl"
    src.write_text("x")
    os.chmod(src, 0o640)
    subprocess.run(["setfacl", "-m", "u:nobody:rw", str(src)], check=True)
    mode = os.stat(src).st_mode
    dst = cluster.mnt / "withacl"
    r = subprocess.run(["cp", "-a", str(src), str(dst)], capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not supported" in r.stderr
    assert os.stat(dst).st_mode == mode
    assert acl_disagreements(dst) == []


def _statvfs_avail(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path) -> int:
    """Write `path` until ENOSPC, in 128 KiB writes and then 4 KiB ones so that the file
    ends within a block of full; the bytes it holds."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (128 * 1024, 4096):
            buf = b"\xa5" * size
            while True:
                try:
                    os.write(fd, buf)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return os.stat(path).st_size


def test_df_available_is_what_a_file_gets(running):
    """With group 0 fuller than group 1, df's available is what one file in group 0
    (the root's) can still get -- not the sum of the groups, nor the emptier group's --
    and after that file hit ENOSPC df offers nothing more.

    Tolerance: the file's own indirect blocks (one per 1024 data blocks, plus the upper
    levels) come out of the same free blocks, so the file gets up to 1/1024 of it less,
    plus a few blocks; 1/512 + 64 KiB covers that and nothing like a second group."""
    mnt = running.mnt
    (mnt / "pre").write_bytes(b"\0" * (8 << 20))      # group 0 the fuller one
    os.sync()
    st = os.statvfs(mnt)
    avail = st.f_bavail * st.f_frsize
    total_free = st.f_bfree * st.f_frsize
    assert avail < total_free / 2 + (1 << 20), (avail, total_free)   # not the sum
    got = _fill(mnt / "big")
    tolerance = avail // 512 + (64 << 10)
    assert got >= avail - tolerance, f"df promised {avail} bytes, a file got {got}"
    assert got <= avail + tolerance, f"df offered {avail} bytes, a file got {got}"
    assert _statvfs_avail(mnt) <= tolerance
    os.unlink(mnt / "big")
    os.unlink(mnt / "pre")


def test_default_cluster_is_large_sparse_and_light(tmp_path):
    """`replfs init` with no --size: every image is 2 GiB of logical size (a 6 GiB array
    per server) yet holds little on disk -- what mkfs wrote, the inode table mostly, under
    3 % of it -- and each started server stays well under 512 MiB of RSS (measured:
    130-300 MiB; 60-75 MiB with the old 128 MiB images, the difference being the block
    cache filled by the first state transfer, which is capped, and 12 MiB of per-block
    maps and checksums)."""
    d = tmp_path / "c"
    replfs("init", d)
    cfg = json.loads((d / "cluster.json").read_text())
    assert cfg["disk_size"] == 2 * 2**30
    for s in ("s0", "s1", "s2", "s3"):
        images = sorted((d / s).glob("disk*.img"))
        assert len(images) == 4
        assert [p.stat().st_size for p in images] == [2 * 2**30] * 4
        logical = sum(p.stat().st_size for p in images)
        on_disk = sum(p.stat().st_blocks * 512 for p in images)
        assert on_disk < logical * 0.03, (s, on_disk, logical)
    cluster = Cluster(str(d))
    try:
        cluster.start_all()
        cluster.wait_protected(timeout=120)
        for s in cluster.cfg.servers:
            rss = psutil.Process(cluster.pid(s)).memory_info().rss
            assert rss < 512 * 2**20, (s, rss)
    finally:
        cluster.stop_all()


def test_fallocate_all_four_modes(cluster):
    """fallocate(1) on the replicated mount: mode 0, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE."""
    check_fallocate_modes(cluster.mnt / "falloc")


def test_fallocate_enospc_up_front(cluster):
    """Asking for more than the group has fails at once with ENOSPC and takes nothing;
    what fallocate got, later writes can use without ENOSPC."""
    d = cluster.mnt / "falloc-space"
    d.mkdir()
    f = d / "big"
    f.write_bytes(b"x")
    avail = _statvfs_avail(cluster.mnt)
    free = os.statvfs(cluster.mnt).f_bfree
    r = fallocate("-l", avail + (64 << 20), f)
    assert r.returncode != 0 and "No space left" in r.stderr, r.stderr
    assert os.stat(f).st_size == 1
    assert os.statvfs(cluster.mnt).f_bfree == free
    # half of what is there: taken, and then written without taking more
    half = avail // 2 // 4096 * 4096
    assert fallocate("-l", half, f).returncode == 0
    free = os.statvfs(cluster.mnt).f_bfree
    with open(f, "r+b") as fh:
        for off in range(0, half, 8 << 20):
            fh.seek(off)
            fh.write(b"y" * min(1 << 20, half - off))
        fh.flush()
        os.fsync(fh.fileno())
    assert os.stat(f).st_size == half
    assert os.statvfs(cluster.mnt).f_bfree == free
    os.unlink(f)
