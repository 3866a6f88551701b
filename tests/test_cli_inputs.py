"""The `replfs` command on bad input: one line saying what is wrong and what to do, no
traceback, a non-zero exit, and nothing created, started or mounted. And --version."""

import os
from importlib.metadata import version
from pathlib import Path

import pytest

from mounthelp import is_mounted, replfs

pytestmark = pytest.mark.timeout(120)


def refused(r, says: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.stderr


def tree(path: Path) -> dict:
    """Every file under `path` with its size (what a refused command must not change;
    an empty folder such as run/ is no trace)."""
    return {str(p.relative_to(path)): p.stat().st_size
            for p in sorted(path.rglob("*")) if not p.is_dir()}


def test_version():
    r = replfs("--version")
    assert r.stdout.strip() == f"replfs {version('replfs')}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """A cluster, never started."""
    d = tmp_path_factory.mktemp("inputs") / "c"
    replfs("init", d, "--size", "16M")
    return d


@pytest.fixture
def secret(cluster):
    """The cluster's secret file; put back as it was after the test."""
    path = cluster / "secret"
    good = path.read_bytes()
    yield path
    path.write_bytes(good)
    os.chmod(path, 0o600)


@pytest.mark.parametrize("content, says", [
    (b"", "is empty"),
    (b"\n", "is empty"),
    (b"0123456789abcdef\n", "is damaged (want 64 hex digits)"),
    (b"zz" * 32 + b"\n", "is damaged (want 64 hex digits)"),
    (b"\xff\xfe" * 40, "is damaged (want 64 hex digits)"),
    (None, "is missing"),
])
@pytest.mark.parametrize("command", ["up", "mount"])
def test_bad_secret_refused(cluster, secret, tmp_path, content, says, command):
    if content is None:
        secret.unlink()
    else:
        secret.write_bytes(content)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = tree(cluster)
    r = replfs(command, cluster, mnt, "--daemon", check=False)
    refused(r, says)
    assert f"replfs init --new-secret {cluster}" in r.stderr
    assert not is_mounted(mnt)
    assert tree(cluster) == before          # no logs, no pid files: nothing started


def test_new_secret_replaces_a_damaged_one(cluster, secret):
    from replfs.replication.config import ClusterConfig
    secret.write_bytes(b"")
    r = replfs("init", "--new-secret", cluster)
    assert "wrote a new secret" in r.stdout
    assert oct(os.stat(secret).st_mode & 0o777) == oct(0o600)
    assert len(ClusterConfig.load(str(cluster)).secret()) == 32


def test_mkfs_into_a_cluster_refused(cluster):
    before = tree(cluster)
    refused(replfs("mkfs", cluster, "--size", "16M", check=False), "is a replfs cluster")
    refused(replfs("mkfs", cluster, "--size", "16M", "--force", check=False),
            "is a replfs cluster")
    assert tree(cluster) == before


@pytest.mark.parametrize("command", ["mkfs", "init"])
def test_a_non_empty_directory_refused(tmp_path, command):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine\n")
    refused(replfs(command, d, "--size", "16M", check=False), "is not empty")
    assert os.listdir(d) == ["notes.txt"]


def test_init_on_an_array_refused(tmp_path):
    d = tmp_path / "a"
    replfs("mkfs", d, "--size", "16M")
    before = tree(d)
    refused(replfs("init", d, "--size", "16M", check=False), "holds a replfs array")
    assert tree(d) == before



@pytest.mark.parametrize("command", ["init", "mkfs"])
def test_a_failed_init_or_mkfs_leaves_nothing(tmp_path, command):
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for d in (new, empty):
        refused(replfs(command, d, "--disks", "2", "--size", "16M", check=False),
                "RAID-5 needs at least 3 disks")
    assert not new.exists()
    assert os.listdir(empty) == []


@pytest.mark.parametrize("args, says", [
    (["--viewservers", "2"], "2 view servers need etcd to share their views: give --etcd"),
    (["--viewservers", "0"], "a cluster needs at least one view server"),
    (["--etcd", "localhost"], "etcd endpoint 'localhost': want HOST:PORT"),
])
def test_view_service_options_checked(tmp_path, args, says):
    d = tmp_path / "c"
    refused(replfs("init", d, "--size", "16M", *args, check=False), says)
    assert not d.exists()


def test_a_view_server_that_is_not_in_the_cluster(cluster):
    refused(replfs("viewserver", cluster, "--name", "vs7", check=False),
            "no view server 'vs7' in")


@pytest.mark.parametrize("how", ["up", "mount", "mount --local"])
def test_missing_mountpoint_named_as_such(cluster, tmp_path, how):
    src = cluster
    if how == "mount --local":
        src = tmp_path / "a"
        replfs("mkfs", src, "--size", "16M")
    mnt = tmp_path / "no" / "such"
    cmd, *flags = how.split()
    r = replfs(cmd, *flags, src, mnt, "--daemon", check=False)
    refused(r, f"mount point {mnt} does not exist; create it with `mkdir -p {mnt}`")
    assert not (tmp_path / "no").exists()


def test_mountpoint_that_is_a_file(tmp_path):
    src, mnt = tmp_path / "a", tmp_path / "f"
    replfs("mkfs", src, "--size", "16M")
    mnt.write_text("")
    refused(replfs("mount", "--local", src, mnt, "--daemon", check=False), "is not a directory")


def test_mount_form_misused(cluster, tmp_path):
    refused(replfs(cluster, check=False), "the mount form")
    refused(replfs(cluster, tmp_path, "-o", "bogus", check=False), "unknown mount option 'bogus'")
    refused(replfs(tmp_path, tmp_path, check=False),
            "holds neither a replfs cluster nor an array")


def test_a_reader_that_went_away_ends_the_command_quietly(cluster):
    # `replfs status DIR | head`: the pipe's reader is gone before the report is written
    import subprocess
    import sys
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "replfs.tools.cli", "status", str(cluster)],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == 141
