"""`replfs raid ...` and `replfs fault ...` as a user runs them: real subprocesses of the
installed command, clear errors (no tracebacks), exit codes, nothing lost on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

REPLFS = os.path.join(os.path.dirname(sys.executable), "replfs")


def run(*args, input=None, ok=True):
    p = subprocess.run([REPLFS, *args], input=input, capture_output=True, timeout=60)
    out, err = p.stdout, p.stderr.decode()
    assert "Traceback" not in err, err
    if ok:
        assert p.returncode == 0, err
    return p.returncode, out, err


@pytest.fixture
def arr(tmp_path):
    d = str(tmp_path / "arr")
    run("raid", "create", d, "--disks", "4", "--size", "4M", "--chunk", "16K")
    return d


def test_create_and_status(arr):
    _, out, _ = run("raid", "status", arr, "--json")
    st = json.loads(out)
    assert st["health"] == "healthy" and st["ndisks"] == 4 and st["chunk"] == 16384
    assert [d["state"] for d in st["disks"]] == ["active"] * 4
    _, out, _ = run("raid", "status", arr)
    assert b"healthy" in out


def test_write_read_roundtrip_unaligned(arr):
    data = os.urandom(300_001)
    _, _, err = run("raid", "write", arr, "--offset", "5000", input=data)
    assert "wrote 300001 bytes" in err
    _, out, _ = run("raid", "read", arr, "--offset", "5000", "--length", "300001")
    assert out == data
    _, out, _ = run("raid", "read", arr, "--offset", "0", "--length", "5000")
    assert out == bytes(5000)


def test_corrupt_repair_counted_in_status_of_another_process(arr):
    data = os.urandom(1 << 20)
    run("raid", "write", arr, input=data)
    _, out, _ = run("fault", "corrupt", os.path.join(arr, "disk2.img"), "--count", "40",
                    "--seed", "9", "--area", "data")
    assert out.count(b"[data]") == 40
    _, again, _ = run("fault", "corrupt", os.path.join(arr, "disk2.img"), "--count", "40",
                      "--seed", "9", "--area", "data")
    assert [ln.split(b":")[1] for ln in again.splitlines()[:40]] == \
        [ln.split(b":")[1] for ln in out.splitlines()[:40]]  # same seed, same blocks
    _, out, _ = run("raid", "read", arr, "--length", str(1 << 20))
    assert out == data
    st = json.loads(run("raid", "status", arr, "--json")[1])
    assert st["disks"][2]["cksum_errors"] > 0
    _, out, _ = run("raid", "scrub", arr)
    assert b"blocks checked" in out


def test_fail_disk_remove_rebuild(arr, tmp_path):
    data = os.urandom(1 << 20)
    run("raid", "write", arr, input=data)
    _, out, _ = run("fault", "fail-disk", arr, "--disk", "1", "--remove")
    assert b"marked failed" in out and not os.path.exists(os.path.join(arr, "disk1.img"))
    st = json.loads(run("raid", "status", arr, "--json")[1])
    assert st["health"] == "degraded" and st["disks"][1]["state"] == "missing"
    assert run("raid", "read", arr, "--length", str(1 << 20))[1] == data
    new = str(tmp_path / "new1.img")
    _, out, _ = run("raid", "rebuild", arr, "--disk", "1", "--image", new)
    assert b"rebuilt onto" in out
    st = json.loads(run("raid", "status", arr, "--json")[1])
    assert st["health"] == "healthy" and st["disks"][1]["path"] == new
    run("fault", "fail-disk", arr, "--disk", "3")
    assert run("raid", "read", arr, "--length", str(1 << 20))[1] == data


@pytest.mark.parametrize("args,msg", [
    (["raid", "create", "{d}/x", "--disks", "2", "--size", "4M"], "at least 3 disks"),
    (["raid", "create", "{d}/x", "--disks", "3", "--size", "lots"], "cannot read size"),
    (["raid", "create", "{d}/x", "--disks", "3", "--size", "64K"], "too small"),
    (["raid", "create", "{d}/x", "--disks", "3", "--size", "4M", "--chunk", "3K"],
     "power of two"),
    (["raid", "status", "{d}/nowhere"], "no such directory"),
    (["raid", "status", "{d}"], "no array here"),
    (["raid", "read", "{d}/arr", "--offset", "1G", "--length", "1"], "outside the array"),
    (["raid", "rebuild", "{d}/arr", "--disk", "7"], "no disk 7"),
    (["fault", "corrupt", "{d}/none.img"], "cannot open"),
    (["fault", "fail-disk", "{d}/arr", "--disk", "9"], "no disk 9"),
])
def test_bad_input_gets_a_clear_error(arr, tmp_path, args, msg):
    args = [a.format(d=tmp_path) for a in args]
    rc, _, err = run(*args, ok=False)
    assert rc != 0 and msg in err, err
    assert err.startswith("replfs ")


def test_create_over_existing_array_loses_nothing(arr):
    run("raid", "write", arr, input=b"keep me" * 1000)
    rc, _, err = run("raid", "create", arr, "--disks", "3", "--size", "4M", ok=False)
    assert rc != 0 and "already holds an array" in err
    assert run("raid", "read", arr, "--length", "7000")[1] == b"keep me" * 1000


def test_write_past_end_is_refused(arr):
    st = json.loads(run("raid", "status", arr, "--json")[1])
    rc, _, err = run("raid", "write", arr, "--offset", str(st["size_bytes"] - 10),
                     input=b"x" * 100, ok=False)
    assert rc != 0 and "past the end" in err


def test_two_disks_gone_exit_code_and_message(arr):
    os.remove(os.path.join(arr, "disk0.img"))
    os.remove(os.path.join(arr, "disk1.img"))
    rc, _, err = run("raid", "read", arr, "--length", "4096", ok=False)
    assert rc == 3 and "cannot start" in err and "disk 0" in err and "disk 1" in err
    rc, out, _ = run("raid", "status", arr, ok=False)
    assert rc == 3 and b"failed" in out


def test_unreadable_block_exit_code(arr):
    run("raid", "write", arr, input=b"d" * (1 << 20))
    # damage the same stripe on two disks
    for k in (0, 1):
        run("fault", "corrupt", os.path.join(arr, f"disk{k}.img"), "--count", "400",
            "--seed", "1", "--area", "any", "--mode", "flip")
    rc, out, err = run("raid", "read", arr, "--length", str(1 << 20), ok=False)
    assert rc == 4 and "I/O error" in err


def test_bench_raid_runs(tmp_path):
    _, out, _ = run("bench", "raid", "--size", "6M", "--rounds", "1", "--dir", str(tmp_path))
    text = out.decode()
    for name in ("raw write", "sequential write", "sequential read", "degraded read",
                 "rebuild", "scrub", "numpy"):
        assert name in text, text
    assert os.listdir(tmp_path) == []  # cleaned up
