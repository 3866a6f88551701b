"""`replfs fault corrupt` on one image of a mounted filesystem: every file still reads
back exactly, and `replfs raid status` counts the repairs."""

import hashlib
import json
import os
import subprocess

import pytest

from mounthelp import Mount, replfs

pytestmark = pytest.mark.timeout(240)


def write_tree(root, n=40):
    digests = {}
    for i in range(n):
        sub = root / f"d{i % 5}"
        sub.mkdir(exist_ok=True)
        data = os.urandom(1000 + i * 9000)
        (sub / f"f{i}").write_bytes(data)
        digests[f"d{i % 5}/f{i}"] = hashlib.sha256(data).hexdigest()
    return digests


def check_tree(root, digests):
    for rel, dg in digests.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == dg, f"{rel} differs"


def cksum_repairs(data_dir):
    st = json.loads(replfs("raid", "status", data_dir, "--json").stdout)
    return {d["index"]: d["cksum_errors"] for d in st["disks"]}


@pytest.mark.parametrize("area", ["any", "data", "parity", "checksum"])
def test_corrupt_one_image_of_a_mounted_fs(tmp_path, area):
    data_dir, mnt = tmp_path / "data", tmp_path / "mnt"
    replfs("mkfs", data_dir, "--disks", "4", "--size", "32M")
    # where checksum blocks are hit, the mount keeps the fewest checksum pages it can (4
    # of each member's 8): damaged ones are found when read again, not at assembly only
    args = ["--checksum-cache", "4K"] if area in ("any", "checksum") else []
    m = Mount(data_dir, mnt, args=args)
    try:
        m.start()
        digests = write_tree(mnt)
        os.sync()
        # damage one image under the running mount, then read everything back through
        # it (cold: the kernel's cache is dropped, and files not read yet come from disk)
        out = replfs("fault", "corrupt", data_dir / "disk1.img", "--count", "300",
                     "--seed", "11", "--area", area).stdout
        assert out.strip()
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        check_tree(mnt, digests)
    finally:
        m.stop()
    # repair what the reads did not touch, so that the next round damages one disk only
    scrub = replfs("raid", "scrub", data_dir, check=False)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
    # a second round, on another disk, with the filesystem cold after a remount
    replfs("fault", "corrupt", data_dir / "disk2.img", "--count", "300", "--seed", "12",
           "--area", area)
    m = Mount(data_dir, mnt, args=args)
    try:
        m.start()
        check_tree(mnt, digests)
        (mnt / "after").write_bytes(b"still writable")
    finally:
        m.stop()
    assert replfs("fsck", data_dir, check=False).returncode == 0
    repairs = cksum_repairs(data_dir)
    if area in ("any", "data", "parity"):
        assert repairs[1] + repairs[2] > 0, repairs
    scrub = replfs("raid", "scrub", data_dir, check=False)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr


def test_two_damaged_disks_give_eio_never_wrong_bytes(tmp_path):
    data_dir, mnt = tmp_path / "data", tmp_path / "mnt"
    replfs("mkfs", data_dir, "--disks", "4", "--size", "32M")
    m = Mount(data_dir, mnt)
    try:
        m.start()
        digests = write_tree(mnt)
    finally:
        m.stop()
    for disk, seed in ((1, 21), (2, 22)):
        replfs("fault", "corrupt", data_dir / f"disk{disk}.img", "--count", "2000",
               "--seed", str(seed), "--area", "data")
    m = Mount(data_dir, mnt)
    ok = eio = 0
    try:
        try:
            m.start()
        except AssertionError:
            # metadata the mount needs is beyond repair: it must say so, not mount garbage
            assert "cannot" in m.logtext()
            return
        for rel, dg in digests.items():
            try:
                content = (mnt / rel).read_bytes()
            except OSError as exc:
                assert exc.errno == 5, exc
                eio += 1
                continue
            assert hashlib.sha256(content).hexdigest() == dg, f"{rel}: wrong bytes returned"
            ok += 1
    finally:
        m.stop()
    assert ok + eio == len(digests)
