#!/usr/bin/env bash
# Installs everything replfs needs on a fresh Debian machine; safe to run twice.
#   - Debian packages fuse3, libfuse3-dev, pkg-config (pyfuse3 builds against libfuse3)
#   - a virtualenv in .venv with `pip install -e .[test]`
#   - /usr/local/bin/replfs -> .venv/bin/replfs, for mount -t fuse.replfs (mount.fuse3's PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fuse3 libfuse3-dev pkg-config >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv" >&2
    "$PY" -m venv .venv
fi
# Re-install only when pyproject.toml changed since the last successful install.
stamp=.venv/.replfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: pip install -e .[test]" >&2
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e '.[test]' >&2
    touch "$stamp"
fi

# `mount -t fuse.replfs DIR MNT` (and an /etc/fstab line) run `replfs DIR MNT -o OPTS`
# through mount.fuse3, whose PATH is /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:...
# (not the venv): link the command there. Needs root (or sudo without a password).
link=/usr/local/bin/replfs
target="$PWD/.venv/bin/replfs"
if [ "$(readlink "$link" 2>/dev/null)" != "$target" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    if $SUDO ln -sfn "$target" "$link" 2>/dev/null; then
        echo "bootstrap: linked $link -> $target (for mount -t fuse.replfs)" >&2
    else
        echo "bootstrap: could not link $link -> $target; as root, run" \
             "\`ln -sfn $target $link\` for mount -t fuse.replfs" >&2
    fi
fi
