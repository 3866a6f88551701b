#!/usr/bin/env bash
# Installs everything replfs and its tests need on a fresh (even minimal) Debian machine;
# safe to run twice, and silent when everything is already there.
#   - the Debian packages that are missing, among: python3 python3-venv python3-dev
#     gcc libc6-dev pkg-config fuse3 libfuse3-dev (pyfuse3 has no wheels: pip compiles it
#     against libfuse3), ca-certificates (pip over https), and what the tests run:
#     git rsync acl mount iproute2 util-linux (ip netns and nsenter: one network
#     namespace per node in tests/replication/test_netns.py), etcd-server (the view
#     service's store in many-machine mode; the tests start their own etcd members,
#     never the service the package installs)
#   - a virtualenv in .venv with `pip install -e .[test]`, and pyfuse3 rebuilt with the
#     patches in tools/pyfuse3/ (fallocate, the page-cache switch: tools/pyfuse3/build.sh)
#   - /usr/local/bin/replfs -> .venv/bin/replfs, for mount -t fuse.replfs (mount.fuse3's PATH)
# tools/check_fresh_debian.sh proves it in a chroot made from Debian's base packages only.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
need=()
want() { local p; for p; do [[ " ${need[*]-} " == *" $p "* ]] || need+=("$p"); done; }
has() { command -v "$1" >/dev/null 2>&1; }
if has "$PY"; then
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || want python3-venv
    "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        2>/dev/null || want python3-dev
else
    want python3 python3-venv python3-dev
fi
if ! has gcc; then
    want gcc libc6-dev
elif ! printf '#include <stdio.h>\nint main(void) { return 0; }\n' \
        | gcc -x c -o /dev/null - >/dev/null 2>&1; then
    want libc6-dev
fi
has pkg-config || want pkg-config
{ has pkg-config && pkg-config --exists fuse3; } 2>/dev/null || want libfuse3-dev
has fusermount3 || want fuse3
[ -s /etc/ssl/certs/ca-certificates.crt ] || want ca-certificates
has git || want git
has rsync || want rsync
{ has getfacl && has setfacl; } || want acl
{ has mount && has umount; } || want mount
has ip || want iproute2
has nsenter || want util-linux
has etcd || want etcd-server
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${need[*]}" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        has sudo || { echo "bootstrap: run as root (or install sudo) to install: ${need[*]}" >&2; exit 1; }
        SUDO="sudo"
    fi
    $SUDO apt-get update -qq >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >&2
fi

# (A .venv without pip is what `python3 -m venv` leaves when python3-venv is missing.)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pip' 2>/dev/null; then
    echo "bootstrap: creating .venv" >&2
    "$PY" -m venv --clear .venv
    rm -f .venv/.replfs-installed
fi
# pyfuse3 with fallocate (a patched 3.5.0; nothing to do when it is there already), first:
# then `pip install -e .` finds it and compiles no other pyfuse3.
tools/pyfuse3/build.sh .venv/bin/python
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
