#!/usr/bin/env bash
# Set up the environment and run the tests: pytest over tests/ and nbval over notebooks/.
# Extra arguments go to pytest; `-m unit`, `-m models` or `-m notebooks` runs one tier
# (docs/testing.md). Without them all three run, as CI does.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
exec "$py" -m pytest "$@"
