"""Two-phase commit between replica groups, on a real two-group cluster: real server
processes, a real FUSE mount, crashes at every step of the protocol (a named crash point
ends the process with `os._exit`, as kill -9 at exactly that step would), kill -9 under
concurrent cross-group renames, and fsck of every replica of every group afterwards."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

from clusterhelp import compare_replicas, followers
from replfs.tools.cluster import REPLFS

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def group_of_name(name: str, groups: int = 2) -> int:
    """Where `spread` places a new directory (replication/config.py place_dir)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") % groups


def name_in(group: int, prefix: str) -> str:
    for i in range(1000):
        if group_of_name(f"{prefix}{i}") == group:
            return f"{prefix}{i}"
    raise AssertionError("no name found")


def ino_group(path) -> int:
    return os.stat(path).st_ino >> 48


def replfs(*args, check=True, timeout=60):
    r = subprocess.run([*REPLFS, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"replfs {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def _doubts(st: dict) -> list:
    return [(s, d) for s, info in st["servers"].items() if info
            for d in (info.get("in_doubt") or [])]


def in_doubt(running) -> list:
    return _doubts(running.cluster.status())


def wait_no_doubt(running, timeout=20.0) -> None:
    """Until no server has a transaction in doubt or a decision to deliver."""
    running.cluster.wait_until(
        lambda st: not _doubts(st) and not sum((i or {}).get("pending_decisions", 0)
                                               for i in st["servers"].values()),
        timeout, "every 2PC transaction decided and delivered")


def fsck_cluster(running) -> dict:
    r = replfs("fsck", running.cfg.dir, check=False)
    assert r.returncode == 0, f"fsck found problems:\n{r.stdout}\n{r.stderr}"
    return r


def stop_and_check(running) -> None:
    """Unmount, stop every process, then: fsck of every replica of every group is
    clean, and the replicas of each group hold the same blocks."""
    running.unmount()
    running.cluster.stop_all()
    fsck_cluster(running)
    diff, compared = compare_replicas(running.cfg)
    assert diff == {s: [] for s in followers(running.cfg)}


# ---------------------------------------------------------------- every operation kind
def test_operations_across_groups(running):
    mnt = running.mnt
    a, b = mnt / name_in(0, "a"), mnt / name_in(1, "b")
    a.mkdir()
    b.mkdir()
    assert (ino_group(a), ino_group(b)) == (0, 1)
    (a / "f").write_text("hello")
    os.rename(a / "f", b / "f")                             # rename across groups
    assert not (a / "f").exists() and (b / "f").read_text() == "hello"
    assert ino_group(b / "f") == 0                          # the inode stays where it was
    os.link(b / "f", a / "hard")                            # link: entry in 0, inode in 0
    os.link(a / "hard", b / "hard2")                        # link: entry in 1, inode in 0
    assert os.stat(b / "f").st_nlink == 3
    os.unlink(b / "hard2")                                  # unlink: entry in 1, inode in 0
    os.unlink(a / "hard")
    assert os.stat(b / "f").st_nlink == 1
    with open(b / "f", "rb") as held:                       # unlinked while open: an orphan
        os.unlink(b / "f")                                  # of group 0 until closed
        assert held.read() == b"hello"
    (a / "f").write_text("hello")
    os.rename(a / "f", b / "f")
    (a / "d").mkdir()
    (a / "d" / "x").write_text("x")
    os.rename(a / "d", b / "d")                             # a directory: its `..` moves
    assert os.stat(b).st_nlink == 3 and os.stat(a).st_nlink == 2
    assert os.stat(b / "d" / "..").st_ino == os.stat(b).st_ino
    with pytest.raises(OSError) as ei:
        os.rename(b, b / "d" / "inside")                    # into its own subtree
    assert ei.value.errno == errno.EINVAL
    (b / "victim").write_text("old")
    (a / "new").write_text("new")
    os.rename(a / "new", b / "victim")                      # replace a target elsewhere
    assert (b / "victim").read_text() == "new"
    (b / "e").mkdir()                                       # an empty directory replaced
    os.rename(b / "d", a / "e2")
    os.rename(a / "e2", b / "e")
    assert (b / "e" / "x").read_text() == "x"
    sub = None
    for i in range(20):                                     # mkdir placed in the other group
        p = a / f"s{i}"
        p.mkdir()
        if ino_group(p) == 1:
            sub = p
            break
    assert sub is not None, "spread placement put 20 directories in one group"
    (sub / "deep").write_text("deep")
    assert os.stat(sub / "..").st_ino == os.stat(a).st_ino
    os.unlink(sub / "deep")
    os.rmdir(sub)                                           # rmdir of a directory elsewhere
    with pytest.raises(OSError) as ei:
        os.rmdir(b / "e")
    assert ei.value.errno == errno.ENOTEMPTY
    shutil.rmtree(b)
    assert sorted(p.name for p in a.iterdir()) == sorted(f"s{j}" for j in range(i))
    wait_no_doubt(running)
    st = json.loads(replfs("status", running.cfg.dir, "--json").stdout)
    assert all(not (s or {}).get("in_doubt") for s in st["servers"].values())
    stop_and_check(running)


def test_exchange_and_noreplace_across_groups(running):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(a, b, flags):
        if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    mnt = running.mnt
    a, b = mnt / name_in(0, "a"), mnt / name_in(1, "b")
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("file")
    (b / "d").mkdir()
    (b / "d" / "x").write_text("x")
    renameat2(a / "f", b / "d", 2)              # RENAME_EXCHANGE: a file and a directory
    assert (a / "f" / "x").read_text() == "x" and (b / "d").read_text() == "file"
    assert os.stat(a / "f" / "..").st_ino == os.stat(a).st_ino
    assert os.stat(a).st_nlink == 3 and os.stat(b).st_nlink == 2
    with pytest.raises(OSError) as ei:
        renameat2(b / "d", a / "f", 1)          # RENAME_NOREPLACE
    assert ei.value.errno == errno.EEXIST
    wait_no_doubt(running)
    stop_and_check(running)


# ---------------------------------------------------------------- a shell workload
WORKLOAD = r"""
mkdir -p SRC/tree/sub DST
for i in $(seq 1 30); do printf 'line %s\n' $i > SRC/tree/f$i; done
for i in $(seq 1 5); do mkdir SRC/tree/sub/d$i; echo $i > SRC/tree/sub/d$i/x; done
ln -s ../f1 SRC/tree/sub/link
tar -C SRC -cf archive.tar tree
mkdir -p DST/unpacked && tar -C DST/unpacked -xf archive.tar
mv SRC/tree/f1 DST/moved1
mv SRC/tree/sub DST/sub
mv DST/unpacked/tree/f2 SRC/tree/f1
mv DST/sub/d3 SRC/d3
ln DST/moved1 SRC/hardlink
rm -rf DST/unpacked/tree/sub
mv DST/unpacked SRC/tree/unpacked
rm SRC/tree/f3 DST/sub/d1/x
rmdir DST/sub/d1
rm archive.tar
"""


def tree(root) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        st = os.lstat(dirpath)
        out[rel] = ("dir", st.st_nlink, sorted(dirnames + filenames))
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[os.path.join(rel, n)] = ("link", os.readlink(p))
            else:
                out[os.path.join(rel, n)] = ("file", st.st_nlink, open(p, "rb").read())
    return out


def test_shell_workload_gives_the_local_tree(running, tmp_path):
    src, dst = name_in(0, "src"), name_in(1, "dst")
    script = WORKLOAD.replace("SRC", src).replace("DST", dst)
    local = tmp_path / "local"
    local.mkdir()
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=local, check=True)
    running.sh(script)
    assert ino_group(running.mnt / src) == 0 and ino_group(running.mnt / dst) == 1
    assert tree(running.mnt) == tree(local)
    wait_no_doubt(running)
    stop_and_check(running)


# ---------------------------------------------------------------- crashes at every step
COORDINATOR = ["2pc.coord.planned", "2pc.coord.prepared", "2pc.coord.logged",
               "2pc.coord.replicated", "2pc.coord.told", "2pc.coord.acknowledged"]
PARTICIPANT = ["2pc.part.begin", "2pc.part.prepared", "2pc.part.acked",
               "2pc.part.committed", "2pc.part.decided"]


def crash_round(running, a, b, point: str, group: int, k: int) -> None:
    """Arm `point` in `group`'s primary, rename a file a -> b (coordinator: group of a),
    and check the outcome once the crashed server is replaced."""
    victim = running.primary(group)
    f_src, f_dst = a / f"f{k}", b / f"f{k}"
    f_src.write_text(f"file {k}\n")
    d_src, d_dst = a / f"d{k}", b / f"d{k}"
    d_src.mkdir()
    (d_src / "inner").write_text(str(k))
    replfs("fault", "crash-at", running.cfg.dir, "--server", victim, point)
    os.rename(f_src, f_dst)     # the client retries through the failover
    proc = running.cluster.procs[victim]
    proc.wait(30)
    assert proc.returncode == 77, f"{victim} did not crash at {point} (exit {proc.returncode})"
    assert not f_src.exists() and f_dst.read_text() == f"file {k}\n"
    os.rename(d_src, d_dst)     # a directory too, across the failover
    assert not d_src.exists() and (d_dst / "inner").read_text() == str(k)
    assert os.stat(d_dst / "..").st_ino == os.stat(b).st_ino
    wait_no_doubt(running)
    # nothing stays locked: both directories and both inodes take new operations
    os.rename(f_dst, a / f"back{k}")
    (a / f"back{k}").write_text("again")
    (b / f"new{k}").write_text("x")
    running.cluster.start_server(victim)
    running.cluster.wait_protected(timeout=60)


@pytest.mark.parametrize("role", ["coordinator", "participant"])
def test_crash_at_every_step(running, role):
    mnt = running.mnt
    a, b = mnt / name_in(0, "a"), mnt / name_in(1, "b")
    a.mkdir()
    b.mkdir()
    points = COORDINATOR if role == "coordinator" else PARTICIPANT
    group = 0 if role == "coordinator" else 1      # renames a -> b: coordinator is a's group
    for k, point in enumerate(points):
        crash_round(running, a, b, point, group, k)
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    n = len(points)
    assert names_a == sorted(f"back{k}" for k in range(n))
    assert names_b == sorted([f"d{k}" for k in range(n)] + [f"new{k}" for k in range(n)])
    assert os.stat(b).st_nlink == 2 + n and os.stat(a).st_nlink == 2
    stop_and_check(running)


# ---------------------------------------------------------------- contention and kills
def check_histories(running) -> None:
    """Every primary's streamed history, merged over the cluster (a distributed
    transaction is one node): conflict-serializable, and no distributed transaction
    committed in one group and aborted in another."""
    from replfs.txn.history import check_serializable, merge_streams
    files = sorted(running.history_dir.glob("*.hist"))
    sources: dict = {}
    for f in files:
        sources.setdefault(int(f.name.split("-")[0][1:]), []).append(str(f))
    assert set(sources) == {0, 1} and len(files) >= 4      # both groups, several primaries
    events, committed, problems = merge_streams(sources)
    assert problems == []
    distributed = {t for t in committed if ":" not in t}     # gtids; others are file:txn
    assert len(distributed) > 20, "few distributed transactions were recorded"
    result = check_serializable(events, committed)
    assert result, f"not serializable: cycle {result.cycle}"
    assert result.transactions > 100


@pytest.mark.history
def test_concurrent_renames_both_ways_with_kills(running):
    mnt = running.mnt
    a, b = mnt / name_in(0, "a"), mnt / name_in(1, "b")
    a.mkdir()
    b.mkdir()
    files = [f"f{i}" for i in range(24)]
    for f in files:
        (a if int(f[1:]) % 2 else b).joinpath(f).write_text(f)
    stop = threading.Event()
    errors: list = []
    moves = [0]

    def mover(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            f = rng.choice(files)
            src, dst = (a, b) if rng.random() < 0.5 else (b, a)
            try:
                os.rename(src / f, dst / f)
                moves[0] += 1
            except FileNotFoundError:
                pass                    # it was on the other side
            except OSError as exc:
                errors.append(f"{f}: {exc}")
    threads = [threading.Thread(target=mover, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            time.sleep(2.0)                     # renames run before each kill
            group = round_ % 2
            view = running.view(group)
            victim = view["primary"]
            running.cluster.signal(victim, signal.SIGKILL)
            running.cluster.wait_until(         # the backup took over
                lambda st: st["viewserver"]["groups"][str(group)]["view"] > view["view"],
                timeout=30, what="a new view")
            running.cluster.start_server(victim)
            running.cluster.wait_protected(timeout=60)
        time.sleep(1.0)                         # and after the last restart
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a rename never finished (a lasting deadlock)"
    assert errors == []
    assert moves[0] > 50
    in_a = {p.name for p in a.iterdir()}
    in_b = {p.name for p in b.iterdir()}
    assert in_a & in_b == set()                 # every file in exactly one place
    assert in_a | in_b == set(files)
    for f in files:
        assert ((a if f in in_a else b) / f).read_text() == f
    wait_no_doubt(running)
    stop_and_check(running)
    check_histories(running)


# ---------------------------------------------------------------- in doubt, visibly
def test_in_doubt_while_the_coordinator_is_unreachable(running):
    """The coordinator crashes after the participant voted YES, and the participant is
    cut off from the coordinator's group: it stays in doubt (locks held; `replfs
    status` shows the transaction and its age) until it can ask; then, no decision
    having been logged, it aborts, and the client's retried rename completes."""
    mnt = running.mnt
    a, b = mnt / name_in(0, "a"), mnt / name_in(1, "b")
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("f")
    coord, part = running.primary(0), running.primary(1)
    successor = next(s for s in running.cfg.groups[0] if s != coord)
    # the participant cannot reach the server that will take the coordinator's place
    replfs("fault", "partition", running.cfg.dir, part, successor)
    replfs("fault", "crash-at", running.cfg.dir, "--server", coord, "2pc.coord.prepared")
    result: dict = {}

    def mv():
        try:
            os.rename(a / "f", b / "f")
            result["ok"] = True
        except OSError as exc:
            result["error"] = exc
    t = threading.Thread(target=mv, daemon=True)
    t.start()
    try:
        running.cluster.procs[coord].wait(30)
        deadline = time.monotonic() + 20
        while True:
            doubt = [d for _, d in in_doubt(running) if (d.get("age") or 0) >= 2.0]
            if doubt:
                break
            assert time.monotonic() < deadline, "the participant never showed a transaction in doubt"
            time.sleep(0.2)
        assert doubt[0]["coordinator"] == 0 and doubt[0]["gtid"].startswith("0.")
        text = replfs("status", running.cfg.dir, check=False).stdout   # not healthy
        assert "in doubt" in text and doubt[0]["gtid"] in text
        assert "ok" not in result           # the rename waits for the participant's locks
    finally:
        replfs("fault", "heal", running.cfg.dir)
    t.join(90)
    assert result == {"ok": True}
    wait_no_doubt(running)
    assert not (a / "f").exists() and (b / "f").read_text() == "f"
    running.cluster.start_server(coord)
    running.cluster.wait_protected(timeout=60)
    stop_and_check(running)
