"""`mount -t fuse.replfs`, an /etc/fstab line, `umount`, and allow_other reaching the
mount: real mount(8) (through Debian's mount.fuse3, which runs `replfs SOURCE MNT -o
OPTIONS` from /usr/local/bin), real clusters, real FUSE mounts."""

import errno
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from clusterhelp import Running
from mounthelp import REPO, force_unmount, is_mounted, replfs

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

# mount.fuse3 runs the helper by /bin/sh -c with this PATH, whatever mount(8)'s own was
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def mount_options(mnt) -> set[str]:
    """The per-mount and the superblock options of the mount on `mnt`
    (/proc/self/mountinfo), as one set."""
    mnt = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            if fields[4].encode().decode("unicode_escape") == mnt:
                return set(fields[5].split(",")) | set(post.split()[2].split(","))
    raise AssertionError(f"{mnt} is not in /proc/self/mountinfo")


def mount_entries(mnt) -> list[tuple[str, str]]:
    """(type, source) of each mount on `mnt`, from /proc/self/mountinfo."""
    mnt = os.path.realpath(mnt)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if pre.split()[4].encode().decode("unicode_escape") == mnt:
                fstype, source = post.split()[:2]
                out.append((fstype, source.encode().decode("unicode_escape")))
    return out


def mount_type(mnt) -> str:
    entries = mount_entries(mnt)
    assert entries, f"{mnt} is not mounted"
    return entries[-1][0]


def served_by(mnt) -> list[psutil.Process]:
    """The replfs processes serving a mount on `mnt` (by their command line)."""
    mnt = os.path.realpath(mnt)
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "replfs.tools.cli" in cmd and "mount" in cmd and mnt in cmd:
            out.append(p)
    return out


def wait_gone(procs: list[psutil.Process], timeout: float = 30) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"still running after {timeout} s: {alive}"


def cleanup(mnt) -> None:
    """Unmount `mnt` and stop whatever serves it, whatever state the test left."""
    procs = served_by(mnt)
    force_unmount(mnt)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def helper_on_path():
    """mount.fuse3 finds `replfs` on its own PATH: it must be this checkout's."""
    found = shutil.which("replfs", path=HELPER_PATH)
    ours = REPO / ".venv" / "bin" / "replfs"
    assert found and os.path.realpath(found) == os.path.realpath(ours), (
        f"`replfs` on mount.fuse3's PATH is {found}, not {ours}: run tools/bootstrap.sh")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, helper_on_path):
    """A running cluster, not mounted."""
    base = tmp_path_factory.mktemp("helper")
    r = Running(base / "cluster", base / "unused")
    try:
        r.start(mount=False)
        yield r
    finally:
        r.stop()


def mount_t(source, mnt, *opts, check=True) -> subprocess.CompletedProcess:
    argv = ["mount", "-t", "fuse.replfs", str(source), str(mnt)]
    if opts:
        argv += ["-o", ",".join(opts)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"{argv} failed ({r.returncode}): {r.stdout}{r.stderr}"
    return r


def test_mount_t_then_umount(cluster, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount_t(cluster.cfg.dir, mnt, "allow_other", "noatime", "_netdev", "x-systemd.automount")
        assert is_mounted(mnt) and mount_type(mnt) == "fuse.replfs"
        assert {"allow_other", "noatime"} <= mount_options(mnt)
        (mnt / "hello").write_text("through mount -t\n")
        assert (mnt / "hello").read_text() == "through mount -t\n"
        procs = served_by(mnt)
        assert len(procs) == 1
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
        wait_gone(procs)                # umount ends the process that served the mount
    finally:
        cleanup(mnt)


def test_fstab_line(cluster, tmp_path):
    """A line as /etc/fstab would hold it (mount -T reads another file), mounted by its
    mount point alone; `ro` reaches the kernel."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test\n{cluster.cfg.dir}  {mnt}  fuse.replfs  "
                     f"ro,allow_other,nofail,_netdev  0  0\n")
    try:
        r = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert mount_entries(mnt) == [("fuse.replfs", cluster.cfg.dir)]
        # `mount -a` knows the line as mounted (the mount is named by its source)
        r = subprocess.run(["mount", "-a", "-T", str(fstab)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert len(mount_entries(mnt)) == 1
        assert {"ro", "allow_other"} <= mount_options(mnt)
        os.listdir(mnt)
        with pytest.raises(OSError) as exc:
            (mnt / "nope").write_text("x")
        assert exc.value.errno == errno.EROFS
        procs = served_by(mnt)
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        wait_gone(procs)
    finally:
        cleanup(mnt)


def test_mount_t_of_a_local_array(tmp_path, helper_on_path):
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    mnt.mkdir()
    replfs("mkfs", data, "--size", "16M")
    try:
        mount_t(data, mnt)
        assert mount_type(mnt) == "fuse.replfs"
        (mnt / "f").write_text("local\n")
        procs = served_by(mnt)
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        wait_gone(procs)
    finally:
        cleanup(mnt)
    assert "local" not in "".join(os.listdir(mnt))      # unmounted: the empty directory


@pytest.mark.parametrize("source, opts, says", [
    ("cluster", ["bogus"], "unknown mount option 'bogus'"),
    ("empty", [], "holds neither a replfs cluster nor an array"),
])
def test_mount_t_bad_input(cluster, tmp_path, source, opts, says):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "empty").mkdir()
    src = cluster.cfg.dir if source == "cluster" else tmp_path / "empty"
    try:
        r = mount_t(src, mnt, *opts, check=False)
        assert r.returncode != 0 and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not is_mounted(mnt) and not served_by(mnt)
        assert os.listdir(tmp_path / "empty") == []
    finally:
        cleanup(mnt)


def test_mount_daemon_allow_other_reaches_the_mount(cluster, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = replfs("mount", cluster.cfg.dir, mnt, "--daemon", "--allow-other")
        assert re.search(r"pid \d+", r.stdout)
        assert "allow_other" in mount_options(mnt)
        replfs("umount", mnt)
    finally:
        cleanup(mnt)
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    try:                                # without it, other users stay out
        replfs("mount", cluster.cfg.dir, mnt2, "--daemon")
        assert "allow_other" not in mount_options(mnt2)
    finally:
        cleanup(mnt2)


def test_up_allow_other(tmp_path):
    d = tmp_path / "c"
    # reachable by another user (pytest's own tmp folders are 0700)
    mnt = Path(tempfile.mkdtemp(prefix="replfs-mnt-"))
    os.chmod(mnt, 0o755)
    replfs("init", d, "--size", "32M")
    try:
        replfs("up", d, mnt, "--daemon", "--allow-other")
        assert "allow_other" in mount_options(mnt)
        os.chmod(mnt, 0o755)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "ls", "-a", str(mnt)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr          # another user gets in
    finally:
        replfs("down", d, check=False)
        cleanup(mnt)
        shutil.rmtree(mnt, ignore_errors=True)
