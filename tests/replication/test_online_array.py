"""A running server's array repaired while it serves: `replfs fault fail-disk`, `raid
rebuild`, `raid scrub`, `raid pause|resume|cancel|speed` and `raid status` with
`--server S`, as a user runs them (real processes, a real FUSE mount, a shell workload).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clusterhelp import Running, compare_replicas, followers, wait_for
from replfs.errors import ReplfsError
from replfs.replication.config import ClusterConfig
from replfs.tools import raid_online

pytestmark = pytest.mark.timeout(300)

REPLFS = os.path.join(os.path.dirname(sys.executable), "replfs")

# files written, overwritten and checked against a copy on the host's disk, until told to
# stop; any error (EIO, a short read, a mismatch) ends it with a non-zero status
WORKLOAD = r"""
mkdir -p w
i=0
while [ ! -e "$REF/stop" ]; do
  head -c $(( (RANDOM % 64 + 1) * 4096 - RANDOM % 4096 )) /dev/urandom > "$REF/f$i"
  cp "$REF/f$i" "w/f$i"
  cmp "$REF/f$i" "w/f$i"
  if [ $((i % 5)) -eq 4 ]; then
    j=$((i - 3))
    head -c 20000 /dev/urandom > "$REF/part"
    dd if="$REF/part" of="$REF/f$j" bs=4096 seek=1 conv=notrunc status=none
    dd if="$REF/part" of="w/f$j" bs=4096 seek=1 conv=notrunc status=none
    cmp "$REF/f$j" "w/f$j"
  fi
  if [ $i -ge 8 ]; then cmp "$REF/f$((i - 8))" "w/f$((i - 8))"; fi
  i=$((i + 1))
  echo $i > "$REF/count.tmp"; mv "$REF/count.tmp" "$REF/count"
done
"""


@pytest.fixture
def running(tmp_path):
    """One group of two servers, mounted (a second group would only cost time here)."""
    r = Running(tmp_path / "cluster", tmp_path / "mnt", groups=1)
    try:
        r.start()
        yield r
    finally:
        r.stop()


def replfs(*args, ok=True, timeout=120):
    p = subprocess.run([REPLFS, *args], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in p.stderr, p.stderr
    if ok:
        assert p.returncode == 0, f"replfs {' '.join(args)}: {p.stdout}{p.stderr}"
    return p


def array_info(cdir, server) -> dict:
    """What `replfs raid status CDIR --server S --json` prints, asked in-process (the
    polls below would spend most of the test starting the command)."""
    return raid_online.ask(ClusterConfig.load(cdir), server, "status")


def job(cdir, server) -> dict:
    return array_info(cdir, server)["job"] or {}


def job_if_up(cdir, server) -> dict:
    """The job, or {} while the server does not answer yet (starting)."""
    try:
        return job(cdir, server)
    except ReplfsError:
        return {}


class Workload:
    def __init__(self, running, ref):
        self.ref = ref
        ref.mkdir()
        self.proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", WORKLOAD],
                                     cwd=running.mnt, env={**os.environ, "REF": str(ref)},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def count(self) -> int:
        assert self.proc.poll() is None, f"the workload failed: {self.proc.communicate()}"
        try:
            return int((self.ref / "count").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def stop(self) -> tuple[int, str]:
        (self.ref / "stop").touch()
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, err


def test_rebuild_and_scrub_a_serving_primary_under_a_workload(running, tmp_path):
    cdir = running.cfg.dir
    p = running.primary(0)
    work = Workload(running, tmp_path / "ref")
    try:
        wait_for(lambda: work.count() >= 5, 60, "the workload's first files")
        # (the mount names the cluster as well as its directory does)
        out = replfs("fault", "fail-disk", str(running.mnt), "--server", p, "--disk", "2",
                     "--remove").stdout
        assert "marked failed" in out
        a = array_info(cdir, p)["array"]
        assert a["health"] == "degraded" and a["disks"][2]["state"] == "failed"
        n = work.count()
        wait_for(lambda: work.count() >= n + 3, 60, "the workload on a degraded primary")
        new = os.path.join(cdir, p, "new2.img")
        r = replfs("raid", "rebuild", cdir, "--server", p, "--disk", "2", "--image", new,
                   "--no-wait", "--speed-min", "1M", "--speed-max", "1M")
        wait_for(lambda: job(cdir, p)["row"] > 0, 60, "the rebuild's first rows")
        # held half rebuilt: rows below the position are served from the new disk,
        # the others reconstructed from the rest
        replfs("raid", "pause", cdir, "--server", p)
        n = work.count()
        wait_for(lambda: work.count() >= n + 3, 60, "the workload on a half-rebuilt array")
        replfs("raid", "speed", cdir, "--server", p, "--speed-min", "0", "--speed-max", "0")
        replfs("raid", "resume", cdir, "--server", p)
        n = work.count()
        j = wait_for(lambda: (j := job(cdir, p))["state"] != "running" and j, 120,
                     "the rebuild's end")
        during = work.count() - n
        assert j["state"] == "done" and j["result"]["lost_blocks"] == 0, j
        a = array_info(cdir, p)["array"]
        assert a["health"] == "healthy" and a["disks"][2]["path"] == new
        # the rebuilt array scrubs clean, online (DIR/S of a running server: through it)
        r = replfs("raid", "scrub", os.path.join(cdir, p))
        assert "0 checksum errors repaired, 0 parity blocks rewritten, 0 unrecoverable" \
            in r.stdout, r.stdout
        n = work.count()
        wait_for(lambda: work.count() >= n + 3, 60, "the workload after the rebuild")
    finally:
        code, err = work.stop()
    assert code == 0, f"the workload saw an error: {err}"
    print(f"workload files written while the rebuild ran at full speed: {during}")
    diff = subprocess.run(["bash", "-c", f"cd {tmp_path / 'ref'} && for f in f*; do "
                           f"cmp $f {running.mnt}/w/$f || exit 1; done"],
                          capture_output=True, text=True, timeout=120)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    running.stop()
    differ, compared = compare_replicas(running.cfg)
    assert compared > 0 and all(not differ[s] for s in followers(running.cfg)), differ


def test_restart_in_the_middle_cancel_and_bad_input(running, tmp_path):
    """On the backup (a restart of the primary would cost a failover and a resync)."""
    cdir = running.cfg.dir
    p = running.view(0)["backup"]
    for args, words in [
        (["raid", "rebuild", cdir, "--server", "s9", "--disk", "1"], "no server 's9'"),
        (["raid", "rebuild", cdir, "--server", p, "--disk", "7"], "no disk 7"),
        (["raid", "rebuild", cdir, "--server", p, "--disk", "1",
          "--image", os.path.join(cdir, p, "disk0.img")], "is disk 0 of this array"),
        (["fault", "fail-disk", cdir, "--server", p, "--disk", "-1"], "no disk -1"),
        (["raid", "scrub", str(tmp_path / "nothing"), "--speed-min", "5M"], "running server"),
        (["raid", "cancel", cdir, "--server", p], "nothing to cancel"),
        (["raid", "rebuild", str(running.mnt), "--disk", "1"], "with --server S"),
    ]:
        r = replfs(*args, ok=False)
        assert r.returncode != 0 and words in r.stderr and r.stderr.count("\n") == 1, \
            (args, r.stderr)
    st = json.loads(replfs("raid", "status", cdir, "--server", p, "--json").stdout)
    assert st["array"]["health"] == "healthy" and st["job"] is None
    replfs("fault", "fail-disk", cdir, "--server", p, "--disk", "1")
    slow = ["--speed-min", "1M", "--speed-max", "1M"]     # 32 s for a disk
    r = replfs("raid", "rebuild", cdir, "--server", p, "--disk", "1", "--no-wait", *slow)
    assert "rebuild of disk 1: running" in r.stderr
    wait_for(lambda: job(cdir, p)["row"] > 0, 60, "the rebuild's first rows")
    # another job is refused while this one runs, in one line
    r = replfs("raid", "scrub", cdir, "--server", p, ok=False)
    assert r.returncode != 0 and "rebuild of disk 1 is running" in r.stderr
    # stopped and started again in the middle: it goes on from where it stood
    at = job(cdir, p)["row"]
    running.cluster.stop(p)
    st = json.loads(replfs("raid", "status", os.path.join(cdir, p), "--json").stdout)
    assert st["disks"][1]["state"] == "rebuilding" and 0 < st["disks"][1]["rebuild_progress"] < 1
    running.cluster.start_server(p)
    wait_for(lambda: job_if_up(cdir, p).get("state") == "running", 60,
             "the rebuild resumed after the restart")
    j = job(cdir, p)
    assert at <= j["first_row"] and j["speed_max"] == 1 << 20
    assert round(j["first_row"] / j["rows"], 4) == st["disks"][1]["rebuild_progress"]
    # `replfs status` shows it, with its progress
    # (a server slow to answer on a busy machine is left out of one status: ask again)
    wait_for(lambda: f"{p}: rebuild of disk 1: running, " in replfs("status", cdir,
                                                                   ok=False).stdout,
             60, "the rebuild in `replfs status`")
    replfs("raid", "speed", cdir, "--server", p, "--speed-min", "0", "--speed-max", "0")
    wait_for(lambda: job(cdir, p)["state"] == "done", 120, "the rebuild's end")
    assert array_info(cdir, p)["array"]["health"] == "healthy"
    # a scrub can be cancelled; nothing is left running
    replfs("raid", "scrub", cdir, "--server", p, "--no-wait", *slow)
    r = replfs("raid", "cancel", cdir, "--server", p)
    assert "scrub: cancelled" in r.stdout
    r = replfs("raid", "pause", cdir, "--server", p, ok=False)
    assert "nothing to pause" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("who", ["backup", "primary"])
def test_a_server_killed_mid_rebuild_under_writes_comes_back_with_a_full_copy(running,
                                                                             tmp_path, who):
    """A server dies between a data write and its parity write while a disk of it is
    being rebuilt under a workload: the RAID-5 write hole, so some of its blocks are
    lost. (A primary's backup takes over meanwhile.) Started again, it zeroes them, makes
    its filesystem anew, takes a full copy from its partner as its backup (no primary
    role before it has one), and its rebuild goes on to a clean end; the workload never
    sees an error, and the replicas compare identical."""
    from replfs.replication import needscopy
    cdir = running.cfg.dir
    p = running.view(0)[who]
    work = Workload(running, tmp_path / "ref")
    try:
        wait_for(lambda: work.count() >= 5, 60, "the workload's first files")
        replfs("fault", "fail-disk", cdir, "--server", p, "--disk", "1")
        replfs("raid", "rebuild", cdir, "--server", p, "--disk", "1", "--no-wait",
               "--speed-min", "1M", "--speed-max", "1M")
        wait_for(lambda: job(cdir, p)["row"] > 0, 60, "the rebuild's first rows")
        replfs("fault", "crash-at", cdir, "--server", p, "raid.between_data_and_parity")
        wait_for(lambda: not running.cluster.alive(p), 60, "the backup's crash")
        st = json.loads(replfs("raid", "status", os.path.join(cdir, p), "--json").stdout)
        assert not st["clean"] and st["disks"][1]["state"] == "rebuilding"
        running.cluster.start_server(p)
        running.cluster.wait_protected(timeout=90)
        log = running.log(p)
        assert "lost to the write hole were zeroed" in log and "made anew" in log, log[-3000:]
        assert running.view(0)["backup"] == p and not needscopy.marked(os.path.join(cdir, p))
        # (status says "degraded" while the rebuild runs: it exits 1)
        assert json.loads(replfs("status", cdir, "--json", ok=False).stdout)["servers"][p][
            "sync_kind"] == "full"
        wait_for(lambda: job_if_up(cdir, p).get("state") == "running", 60,
                 "the rebuild going on after the restart")
        replfs("raid", "speed", cdir, "--server", p, "--speed-min", "0", "--speed-max", "0")
        wait_for(lambda: job(cdir, p)["state"] == "done", 120, "the rebuild's end")
        assert array_info(cdir, p)["array"]["health"] == "healthy"
        r = replfs("raid", "scrub", cdir, "--server", p)
        assert "0 unrecoverable" in r.stdout, r.stdout
        n = work.count()
        wait_for(lambda: work.count() >= n + 3, 60, "the workload after all that")
    finally:
        code, err = work.stop()
    assert code == 0, f"the workload saw an error: {err}"
    running.stop()
    differ, compared = compare_replicas(running.cfg)
    assert compared > 0 and all(not differ[s] for s in followers(running.cfg)), differ
