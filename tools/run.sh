#!/usr/bin/env bash
# The README's run command: installs what it needs, then brings replfs up mounted with
# the embedded defaults: `replfs up DIR MNT` creates (the first time) and starts a local
# cluster in DIR -- a view server and a replica group of two servers, each server with a
# 4-disk RAID-5 array of image files -- and mounts it on MNT in the foreground.
# Ctrl-C unmounts and stops every process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
DIR=${1:-/tmp/replfs-cluster}
MNT=${2:-/tmp/replfs-mnt}
mkdir -p "$MNT"
echo "replfs: cluster in $DIR, mounted on $MNT (Ctrl-C to stop)" >&2
exec .venv/bin/replfs up "$DIR" "$MNT"
