"""Random kills and restarts of servers of both groups under two writers: nothing lost,
nothing doubled, replicas' logical blocks identical and every group clean (fsck)
afterwards. Every fifth file moves into {w}/sub, which the spread placement puts in
group 1 while w1 is in group 0 and w3 in group 1: half the moves are two-phase commits.
A short run by default; the full minute with --soak."""

import os
import random
import signal
import subprocess
import time

import pytest

from clusterhelp import compare_replicas, followers
from replfs.tools.cluster import REPLFS

WRITERS = ("w1", "w3")          # groups 0 and 1 under the spread placement

WRITER = r"""
i=0
mkdir -p {w}/sub
while [ ! -e stop ]; do
  i=$((i+1))
  echo "{w} $i" >> {w}.log
  echo "$i" > {w}/f$i
  if [ $((i % 5)) -eq 0 ]; then mv {w}/f$i {w}/sub/g$i; fi
done
echo $i
"""


def chaos(running, seconds, seed):
    rng = random.Random(seed)
    writers = [subprocess.Popen(["bash", "-eu", "-c", WRITER.format(w=w)], cwd=running.mnt,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for w in WRITERS]
    kills = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 1.0))
            group = rng.choice(sorted(running.cfg.groups))
            view = running.view(group)
            victim = rng.choice([view["primary"], view["backup"]])
            sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP])
            running.cluster.signal(victim, sig)
            kills += 1
            time.sleep(rng.uniform(0.0, 1.0))
            # the view server notices (so the next wait is for the *new* view's backup)
            running.cluster.wait_until(lambda st: st["viewserver"]["groups"][str(group)]["view"]
                                       > view["view"], timeout=30, what="a new view")
            if sig == signal.SIGSTOP:
                running.cluster.signal(victim, signal.SIGCONT)
            else:
                running.cluster.start_server(victim)
            running.cluster.wait_protected(timeout=60)
            for w in writers:
                assert w.poll() is None, f"writer died: {w.communicate()}"
    finally:
        (running.mnt / "stop").write_text("")
        outs = [w.communicate(timeout=120) for w in writers]
    for w, (out, err) in zip(writers, outs):
        assert w.returncode == 0, err
    counts = [int(out.split()[-1]) for out, _ in outs]
    return counts, kills


def check(running, counts):
    assert [os.stat(running.mnt / d).st_ino >> 48 for d in ("w1", "w1/sub", "w3")] == [0, 1, 1]
    for w, n in zip(WRITERS, counts):
        assert n > 10
        lines = (running.mnt / f"{w}.log").read_text().splitlines()
        assert lines == [f"{w} {i}" for i in range(1, n + 1)]
        names = sorted(p.name for p in (running.mnt / w).iterdir())
        assert names == sorted([f"f{i}" for i in range(1, n + 1) if i % 5] + ["sub"])
        moved = sorted(p.name for p in (running.mnt / w / "sub").iterdir())
        assert moved == sorted(f"g{i}" for i in range(5, n + 1, 5))
        for i in range(1, n + 1, 7):
            name = f"sub/g{i}" if i % 5 == 0 else f"f{i}"
            assert (running.mnt / w / name).read_text() == f"{i}\n"
    running.unmount()
    running.cluster.stop_all()
    diff, compared = compare_replicas(running.cfg)
    assert compared > 500 and diff == {s: [] for s in followers(running.cfg)}
    r = subprocess.run([*REPLFS, "fsck", running.cfg.dir], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_random_kills_under_two_writers_short(running):
    counts, kills = chaos(running, seconds=12, seed=1)
    assert kills >= 3
    check(running, counts)


@pytest.mark.timeout(400)
@pytest.mark.soak
def test_random_kills_under_two_writers_minute(running):
    counts, kills = chaos(running, seconds=60, seed=2)
    check(running, counts)
