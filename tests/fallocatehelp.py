"""fallocate(1) in the four modes replfs supports, on any mounted directory (a local
mount, a replicated one): what ext4 gives for each."""

import os
import subprocess
from pathlib import Path


def fallocate(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["fallocate", *map(str, args)], capture_output=True, text=True)


def _ok(*args) -> None:
    r = fallocate(*args)
    assert r.returncode == 0, f"fallocate {' '.join(map(str, args))}: {r.stderr}"


def check_fallocate_modes(d: Path) -> None:
    """Mode 0 (-l), KEEP_SIZE (-n), PUNCH_HOLE (-p) and ZERO_RANGE (-z) in new directory
    `d`, each with the size, blocks and bytes ext4 would give."""
    d.mkdir()
    f = d / "mode0"
    _ok("-l", "1MiB", f)
    st = os.stat(f)
    assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20
    assert f.read_bytes() == bytes(1 << 20)

    k = d / "keep"
    k.write_bytes(b"abc")
    _ok("-n", "-l", "2MiB", k)
    st = os.stat(k)
    assert st.st_size == 3 and st.st_blocks * 512 >= 2 << 20
    assert k.read_bytes() == b"abc"

    data = os.urandom(64 << 10)
    p = d / "punch"
    p.write_bytes(data)
    before = os.stat(p).st_blocks
    _ok("-p", "-o", 4096 + 10, "-l", 5 * 4096, p)
    st = os.stat(p)
    assert st.st_size == len(data) and st.st_blocks < before     # 4 whole blocks freed
    assert p.read_bytes() == data[:4106] + bytes(5 * 4096) + data[4106 + 5 * 4096:]

    z = d / "zero"
    z.write_bytes(data)
    _ok("-z", "-o", 100, "-l", 70000, z)
    assert os.stat(z).st_size == 70100
    assert z.read_bytes() == data[:100] + bytes(70000)
