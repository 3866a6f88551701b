#!/usr/bin/env bash
# The README's run command: installs what it needs, then brings replfs up in DIR.
# Until the filesystem can mount this creates (first time) a local 4-disk RAID-5 array
# in DIR, scrubs it and reports its status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
DIR=${1:-/tmp/replfs-data}
if [ ! -e "$DIR/array.json" ]; then
    .venv/bin/replfs raid create "$DIR" --disks 4 --size 64M
fi
.venv/bin/replfs raid scrub "$DIR"
exec .venv/bin/replfs raid status "$DIR"
