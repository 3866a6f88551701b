#!/usr/bin/env bash
# Proves that tools/bootstrap.sh alone sets replfs up on a truly fresh Debian: builds a
# minimal Debian root (`debootstrap --variant=minbase`: Debian's base packages only),
# copies the repository into it (`git archive REF`, default HEAD: commit first), runs
# tools/bootstrap.sh there under chroot, then checks that `.venv/bin/replfs --version`
# runs, that pyfuse3 was built (with fallocate), that the tools the test suite calls are there, and that
# a second bootstrap is silent. Removes everything it made, even on failure.
# Last, it runs a few real-mount tests through tools/test.sh there (CHECK_TESTS: the
# pytest arguments; empty: none). Needs root, the Debian mirror and PyPI; takes a few
# minutes, so it is not part of tools/test.sh (tests/test_fresh_debian.py, with --soak).
#   tools/check_fresh_debian.sh [REF]      env: SUITE (default: the host's), MIRROR, CHECK_TESTS
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:-HEAD}
say() { echo "check_fresh_debian: $*"; }
[ "$(id -u)" -eq 0 ] || { say "needs root (debootstrap, chroot, mount)" >&2; exit 2; }
suite=${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
mirror=${MIRROR:-http://deb.debian.org/debian}
# Then a few tests through tools/test.sh: a real FUSE mount, cp -a, rsync -aAX, tar, git.
tests=${CHECK_TESTS-tests/fs/test_acl.py tests/fs/test_mount.py::test_git tests/fs/test_mount.py::test_tar_cp_diff_rm tests/fs/test_fallocate.py}
git rev-parse --verify -q "$ref^{commit}" >/dev/null || { say "no commit $ref" >&2; exit 2; }
if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap on the host"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

start=$SECONDS
inner=""
work=$(mktemp -d "${TMPDIR:-/var/tmp}/replfs-fresh.XXXXXX")
root=$work/root
mounted_under() { awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts; }
cleanup() {
    local rc=$? m pid
    trap - EXIT INT TERM
    set +e   # a process already gone, or the killed shell's status, must not stop the cleanup
    # Interrupted: end what we started -- the namespace's shell and whatever runs in the
    # root -- so the namespace, and with it its mounts, goes away.
    if [ -n "${inner:-}" ]; then
        say "interrupted: ending what runs in the root, removing $work" >&2
        for pid in $(ls /proc | grep -E '^[0-9]+$'); do
            [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ] && kill -9 "$pid" 2>/dev/null
        done
        kill -9 "$inner" 2>/dev/null
        wait "$inner" 2>/dev/null
    fi
    # The chroot's mounts live in a private mount namespace (below) and go with it; undo
    # any that are still visible here, then remove the tree -- never across a mount.
    for m in $(mounted_under | sort -r); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
    if [ -n "$(mounted_under)" ]; then
        say "still mounted under $work, not removed:" $(mounted_under) >&2
        rc=1
    else
        rm -rf --one-file-system "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
fail() { say "FAILED: $*" >&2; exit 1; }
step() { say "$1 ($((SECONDS - start)) s)"; }

step "debootstrap --variant=minbase $suite $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; fail "debootstrap"; }
# The host's network settings come along (they are the network's, not packages): its
# resolv.conf, and the local CAs it trusts -- on a network that intercepts TLS, pip
# needs them: ca-certificates (which bootstrap installs) adds them to the system bundle,
# and PIP_CERT points pip there (its own bundle would not have them).
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
pip_cert=""
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    pip_cert=/etc/ssl/certs/ca-certificates.crt
fi
absent=()
for p in python3 python3-venv python3-dev gcc libc6-dev pkg-config fuse3 libfuse3-dev \
         ca-certificates git rsync acl mount iproute2 util-linux etcd-server; do
    chroot "$root" dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' \
        || absent+=("$p")
done
step "fresh root made; not installed in it: ${absent[*]:-nothing}"
mkdir "$root/root/replfs"
git archive "$ref" | tar -x -C "$root/root/replfs"
step "copied $(git rev-parse --short "$ref") into /root/replfs${pip_cert:+, with the local CAs of the host}"

# Everything that mounts and chroots runs in its own mount namespace: /proc, /sys and
# /dev are mounted there only, unmounted on the way out, and gone with the namespace
# whatever happens, so the rm -rf above can never reach the host's /dev.
inside() {
    set -euo pipefail
    root=$1 work=$2 offset=$3 pip_cert=$4 tests=$5   # global: the EXIT trap reads them
    say() { echo "check_fresh_debian: $*"; }
    step() { say "$1 ($((SECONDS + offset)) s)"; }
    fail() { say "FAILED: $*" >&2; exit 1; }
    undo() {   # end what still runs in the root (a test's mount process), unmount all in it
        local pid
        set +e
        for pid in $(ls /proc | grep -E '^[0-9]+$'); do
            [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ] && kill -9 "$pid" 2>/dev/null
        done
        for m in $(awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/self/mounts | sort -r); do
            umount "$m" 2>/dev/null || umount -l "$m"
        done
        return 0
    }
    trap undo EXIT
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --bind /dev "$root/dev"
    mount --bind /dev/pts "$root/dev/pts"
    # A fresh machine's environment: nothing of the host's (no pip settings, no PATH).
    run() {
        chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            ${pip_cert:+PIP_CERT=$pip_cert} \
            bash -c "cd /root/replfs && $1"
    }
    step "tools/bootstrap.sh, first run"
    run "tools/bootstrap.sh" >"$work/bootstrap1.log" 2>&1 \
        || { tail -n 40 "$work/bootstrap1.log" >&2; fail "tools/bootstrap.sh"; }
    grep '^bootstrap:' "$work/bootstrap1.log" | sed 's/^/    /'
    step "tools/bootstrap.sh, second run"
    run "tools/bootstrap.sh" >"$work/bootstrap2.log" 2>&1 || { cat "$work/bootstrap2.log" >&2; fail "second run"; }
    [ ! -s "$work/bootstrap2.log" ] || { cat "$work/bootstrap2.log" >&2; fail "second run was not silent"; }
    say "    silent"
    out=$(run ".venv/bin/replfs --version" 2>&1) || { echo "$out" >&2; fail ".venv/bin/replfs --version"; }
    say "    .venv/bin/replfs --version: $out"
    out=$(run ".venv/bin/python -c 'import pyfuse3, replfs.fs; assert hasattr(pyfuse3.Operations, \"fallocate\"); print(pyfuse3.__version__)'" 2>&1) \
        || { echo "$out" >&2; fail "import pyfuse3 (with fallocate)"; }
    tag=$(run "grep -h '^Tag:' .venv/lib/python3*/site-packages/pyfuse3-*.dist-info/WHEEL" 2>&1) \
        || { echo "$tag" >&2; fail "pyfuse3's WHEEL file"; }
    say "    pyfuse3 $out importable, compiled here (${tag#Tag: })"
    for m in git rsync getfacl setfacl fusermount3 mount umount setpriv tar diff cp etcd; do
        run "command -v $m >/dev/null" || fail "the tests' command $m is missing"
    done
    say "    the tests' commands are there: git rsync getfacl setfacl fusermount3 mount umount setpriv tar diff cp etcd"
    [ "$(run 'readlink /usr/local/bin/replfs')" = /root/replfs/.venv/bin/replfs ] \
        || fail "/usr/local/bin/replfs not linked"
    if [ -n "$tests" ]; then   # the README's test command itself, on a few real-mount tests
        step "tools/test.sh -q $tests"
        run "tools/test.sh -q -p no:cacheprovider $tests" >"$work/tests.log" 2>&1 \
            || { tail -n 40 "$work/tests.log" >&2; fail "tools/test.sh"; }
        say "    $(tail -n 1 "$work/tests.log")"
    fi
}
# In the background, so that a signal to this script is acted on at once (cleanup ends it).
unshare --mount --propagation private \
    bash -c "$(declare -f inside); inside \"\$@\"" _ "$root" "$work" "$((SECONDS - start))" "$pip_cert" "$tests" &
inner=$!
wait "$inner" || fail "in the fresh root"
inner=""
step "passed; cleaning up"
