#!/usr/bin/env bash
# Run the test suite the way CI runs it, at a thread count of your choice: a fresh clone of
# the committed HEAD, with empty model, trace, corpus and target caches, then `.ci/run`.
#
#   bash scripts/check_fresh_clone.sh [THREADS] [extra pytest arguments]
#
# THREADS (default 1) sets OMP_NUM_THREADS / MKL_NUM_THREADS for the tests and for the
# notebook kernels nbval starts. Run it before committing notebook outputs, at a thread
# count other than the one the outputs were made with (they are usually made with the
# machine's default, all cores): the committed outputs must hold on any machine, and a
# different thread count changes float32 summation order the way another machine does.
# Uncommitted changes are not part of the clone: commit first.
#
#   INTATTN_DATA_DIR  the benchmark data (default: shared/data beside this checkout)
#   INTATTN_KEEP      set to 1 to keep the clone and its caches afterwards
#
# Prints the wall time of the set-up and of the tests, and exits with the tests' status.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
threads="${1:-1}"
shift || true
if ! [[ "$threads" =~ ^[1-9][0-9]*$ ]]; then
    echo "THREADS must be a positive integer, got '$threads'" >&2
    exit 2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/intattn-check.XXXXXX")"
if [ "${INTATTN_KEEP:-0}" != "1" ]; then
    trap 'rm -rf "$work"' EXIT
fi
# the clone's default data folder (shared/data beside it) does not exist: name this one's
data="${INTATTN_DATA_DIR:-$(cd "$root/.." && pwd)/shared/data}"

git clone --quiet "$root" "$work/clone"
echo "fresh clone of $(git -C "$root" rev-parse --short HEAD) in $work/clone; $threads thread(s); data: $data" >&2
export INTATTN_CACHE="$work/cache" INTATTN_DATA_DIR="$data"
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"

start=$(date +%s)
bash "$work/clone/scripts/setup_env.sh" > /dev/null
setup=$(( $(date +%s) - start ))
start=$(date +%s)
status=0
(cd "$work/clone" && bash .ci/run "$@") || status=$?
tests=$(( $(date +%s) - start ))
printf 'set-up %dm%02ds, tests %dm%02ds (%d thread(s)), exit status %d\n' \
    $((setup / 60)) $((setup % 60)) $((tests / 60)) $((tests % 60)) "$threads" "$status" >&2
exit "$status"
