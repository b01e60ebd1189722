#!/usr/bin/env bash
# The README's frontier figure: one exact run per setting (one `--setting both` run, full corpus, so both
# protocols) and the frontier over it, one multi-size pass per projection family. Writes
# docs/frontier/frontier.png and the table the analysis falls back on, src/gradsim/bundled/reference/frontier.json
# (package data). Time it on an idle machine (nothing else running).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bundled}
/usr/bin/time -f "exact runs: %e s, peak RSS %M KB" uv run main.py --setting both --candidates all --output-dir "$out"
/usr/bin/time -f "frontier: %e s, peak RSS %M KB" uv run gradsim frontier \
  "$out/gradient-similarity/paraphrased-all" "$out/gradient-similarity/model-generated-all" --output-dir docs/frontier
mv docs/frontier/frontier.json src/gradsim/bundled/reference/frontier.json
