#!/usr/bin/env bash
# pyfuse3 with what replfs needs of it: pyfuse3 3.5.0 (the newest release) does not wire
# libfuse's fallocate into its Operations (every mode answers EOPNOTSUPP), and has no
# switch for libfuse's FUSE_CAP_AUTO_INVAL_DATA (the kernel drops a file's cached pages at
# every new mtime it sees, so a file read right after it was written is read again). This
# builds pyfuse3 3.5.0 from its sdist with every *.patch beside this file:
#   fallocate.patch    `Operations.fallocate(fh, mode, offset, length)`
#   auto_inval.patch   `Operations.enable_auto_inval_data` (default True)
# and installs it into the venv as 3.5.0+replfs.2.
# Usage: tools/pyfuse3/build.sh VENV_PYTHON. Does nothing when the venv's pyfuse3 has both
# already. tools/bootstrap.sh runs it before `pip install -e .`, which then finds pyfuse3
# (3.5.0+replfs.2 satisfies pyproject's pyfuse3>=3.3) and builds no other. Needs what pip
# needs to compile pyfuse3 (tools/bootstrap.sh installs it) and git (for `git apply`); pip
# fetches the sdist and the build's Cython.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py=${1:?usage: build.sh VENV_PYTHON}
patched() {
    "$py" -c 'import pyfuse3, sys
ops = pyfuse3.Operations
sys.exit(not (hasattr(ops, "fallocate") and hasattr(ops, "enable_auto_inval_data")))' 2>/dev/null
}
patched && exit 0
echo "bootstrap: building pyfuse3 3.5.0 with tools/pyfuse3/*.patch (a few minutes)" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$tmp" >&2
tar xzf "$tmp"/pyfuse3-3.5.0.tar.gz -C "$tmp"
for p in "$here"/*.patch; do
    git -C "$tmp/pyfuse3-3.5.0" apply "$p"
done
SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=3.5.0+replfs.2 \
    "$py" -m pip wheel -q --no-deps -w "$tmp/dist" "$tmp/pyfuse3-3.5.0" >&2
if "$py" -m pip show -q pyfuse3 >/dev/null 2>&1; then
    # the wheel first, then the swap: `import pyfuse3` works at every moment
    "$py" -m pip install -q --force-reinstall --no-deps "$tmp"/dist/pyfuse3-*.whl >&2
else        # a new venv: with its dependency (trio), before `pip install -e .`
    "$py" -m pip install -q "$tmp"/dist/pyfuse3-*.whl >&2
fi
patched || { echo "bootstrap: the patched pyfuse3 lacks fallocate or enable_auto_inval_data" >&2
             exit 1; }
