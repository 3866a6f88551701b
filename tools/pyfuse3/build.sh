#!/usr/bin/env bash
# pyfuse3 with fallocate: pyfuse3 3.5.0 (the newest release) does not wire libfuse's
# fallocate into its Operations, so every mode answers EOPNOTSUPP. This builds pyfuse3
# 3.5.0 from its sdist with fallocate.patch beside this file (an `Operations.fallocate(fh,
# mode, offset, length)` handler) and installs it into the venv as 3.5.0+replfs.fallocate.
# Usage: tools/pyfuse3/build.sh VENV_PYTHON. Does nothing when the venv's pyfuse3 already
# has fallocate. tools/bootstrap.sh runs it before `pip install -e .`, which then finds
# pyfuse3 (3.5.0+replfs.fallocate satisfies pyproject's pyfuse3>=3.3) and builds no other. Needs what pip needs to compile pyfuse3 (tools/bootstrap.sh installs it)
# and git (for `git apply`); pip fetches the sdist and the build's Cython.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py=${1:?usage: build.sh VENV_PYTHON}
has_fallocate() { "$py" -c 'import pyfuse3, sys; sys.exit(not hasattr(pyfuse3.Operations, "fallocate"))' 2>/dev/null; }
has_fallocate && exit 0
echo "bootstrap: building pyfuse3 3.5.0 with fallocate (tools/pyfuse3/fallocate.patch)" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$tmp" >&2
tar xzf "$tmp"/pyfuse3-3.5.0.tar.gz -C "$tmp"
git -C "$tmp/pyfuse3-3.5.0" apply "$here/fallocate.patch"
SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=3.5.0+replfs.fallocate \
    "$py" -m pip wheel -q --no-deps -w "$tmp/dist" "$tmp/pyfuse3-3.5.0" >&2
if "$py" -m pip show -q pyfuse3 >/dev/null 2>&1; then
    # the wheel first, then the swap: `import pyfuse3` works at every moment
    "$py" -m pip install -q --force-reinstall --no-deps "$tmp"/dist/pyfuse3-*.whl >&2
else        # a new venv: with its dependency (trio), before `pip install -e .`
    "$py" -m pip install -q "$tmp"/dist/pyfuse3-*.whl >&2
fi
has_fallocate || { echo "bootstrap: the patched pyfuse3 has no fallocate" >&2; exit 1; }
