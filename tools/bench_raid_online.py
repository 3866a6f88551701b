"""`replfs bench raid`'s online rebuild: a disk of a serving primary rebuilt while a shell
workload writes to the mount.

One cluster (one group of two servers, each with a 4-disk array of `disk_size` bytes per
disk, as `replfs up` makes it, mounted) serves all rounds. Each round fails disk 1 of the
primary (`fault fail-disk --server`), starts a workload on the mount (files of 256 KiB
written, read back and removed, in a loop), rebuilds the disk through the server
(`raid rebuild --server`, background job, at the given speed limits), and stops the
workload once the rebuild is done. It reports the rebuild's bytes written to the new
disk per second, for bench_raid.py to set against the raw write speed measured in the
same round, and how many workload files were written meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from replfs.errors import ReplfsError

WORKLOAD = r"""
mkdir -p bench
head -c 262144 /dev/urandom > "$REF/blob"
i=0
while [ ! -e "$REF/stop" ]; do
  cp "$REF/blob" "bench/f$((i % 16))"
  cmp "$REF/blob" "bench/f$((i % 16))"
  i=$((i + 1))
  echo $i > "$REF/count.tmp"; mv "$REF/count.tmp" "$REF/count"
done
rm -rf bench
"""


class OnlineRebuild:
    """A mounted cluster for the online rounds; `close()` stops it (idempotent)."""

    def __init__(self, workdir: str, disk_size: int):
        from replfs.tools.cluster import start_mounted_cluster
        self.base = os.path.join(workdir, "online")
        os.makedirs(self.base)
        self.mnt, self.cluster, self._stop = start_mounted_cluster(
            self.base, disk_size=disk_size, groups=1)
        self.cfg = self.cluster.cfg
        self.server = self.cluster.wait_primary(group=0)["viewserver"]["groups"]["0"][
            "primary"]

    def close(self) -> None:
        try:
            self._stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _count(self, ref: str) -> int:
        try:
            with open(os.path.join(ref, "count")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def round(self, speed_min: int, speed_max: int) -> dict:
        """Fail disk 1, rebuild it under the workload; seconds, bytes, workload files."""
        from replfs.tools.raid_online import ask
        ref = os.path.join(self.base, "ref")
        os.makedirs(ref, exist_ok=True)
        for f in ("stop", "count"):
            if os.path.exists(os.path.join(ref, f)):
                os.remove(os.path.join(ref, f))
        ask(self.cfg, self.server, "fail-disk", disk=1)
        work = subprocess.Popen(["bash", "-euo", "pipefail", "-c", WORKLOAD], cwd=self.mnt,
                                env={**os.environ, "REF": ref}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while self._count(ref) < 2:          # the workload is under way
                if work.poll() is not None or time.monotonic() > deadline:
                    raise ReplfsError(f"bench: the workload did not start: {work.stderr.read()}")
                time.sleep(0.05)
            before = self._count(ref)
            ask(self.cfg, self.server, "rebuild", disk=1, speed_min=speed_min,
                speed_max=speed_max)
            while True:
                job = ask(self.cfg, self.server, "status")["job"]
                if job["state"] not in ("running", "paused"):
                    break
                time.sleep(0.1)
            files = self._count(ref) - before
        finally:
            open(os.path.join(ref, "stop"), "w").close()
            try:
                _, err = work.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                work.kill()
                _, err = work.communicate()
        if job["state"] != "done" or job["result"]["lost_blocks"]:
            raise ReplfsError(f"bench: the online rebuild ended {job['state']}: {job}")
        if work.returncode != 0:
            raise ReplfsError(f"bench: the workload failed during the rebuild: {err}")
        res = job["result"]
        return {"online_rebuild": res["seconds"], "online_bytes": res["bytes"],
                "online_files": files}
