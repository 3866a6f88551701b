"""The two commands on a truly fresh machine: tools/check_fresh_debian.sh debootstraps a
minimal Debian (base packages only), runs tools/bootstrap.sh in it under chroot, checks
`.venv/bin/replfs --version` and a few real-mount tests through tools/test.sh there, and
removes it. Minutes, root, the Debian mirror and PyPI: a soak test (run with --soak).
It checks the committed HEAD (`git archive`), not the working tree."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_bootstrap_on_a_minimal_debian():
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, chroot, mount)")
    r = subprocess.run(["bash", str(ROOT / "tools" / "check_fresh_debian.sh")],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check_fresh_debian: passed" in r.stdout, r.stdout
    assert "replfs --version: replfs " in r.stdout, r.stdout
