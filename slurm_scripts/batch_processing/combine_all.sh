#!/usr/bin/env bash
# Merge every run with partitions under data/ (or the --output-dir given) and print its summary.
# Runs already merged from the same partitions are left as they are, so running it twice changes nothing.
#   bash slurm_scripts/batch_processing/combine_all.sh [--output-dir DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The project's environment when there is one; otherwise whatever python is active.
if [[ -x $root/.venv/bin/python ]]; then
    py=$root/.venv/bin/python
else
    py=${PYTHON:-python}
fi
exec "$py" "$root/slurm_scripts/batch_processing/combine.py" "$@"
