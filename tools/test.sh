#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole suite.
# Extra arguments go to pytest (e.g. `tools/test.sh -k raid`, `tools/test.sh --soak`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
