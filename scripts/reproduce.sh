#!/usr/bin/env bash
# Set up the environment and reproduce every figure and table: runs the notebooks in
# order on the embedded default model, rewriting their outputs and figures/.
# Extra arguments go to `intattn reproduce` (see `intattn reproduce --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
exec "$py" -m intattn_analysis.cli reproduce "$@"
