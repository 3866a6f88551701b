#!/usr/bin/env bash
# The README's run command: installs what it needs, then brings replfs up mounted with
# the embedded defaults: a 4-disk RAID-5 array of image files in DIR (made the first
# time), its filesystem mounted on MNT in the foreground. Ctrl-C unmounts cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
DIR=${1:-/tmp/replfs-data}
MNT=${2:-/tmp/replfs-mnt}
if [ ! -e "$DIR/array.json" ]; then
    .venv/bin/replfs mkfs "$DIR" --disks 4 --size 256M
fi
mkdir -p "$MNT"
echo "replfs: mounting $DIR on $MNT (Ctrl-C to unmount)" >&2
exec .venv/bin/replfs mount --local "$DIR" "$MNT"
