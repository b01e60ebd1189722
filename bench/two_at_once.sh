#!/usr/bin/env bash
# Two default studies (README's main command, --setting both) started at once on this machine, each in its own
# output folder, with GNU time's wall time and peak RSS per run (issue 26: "two at once finish on this machine
# kind"). Run it with nothing else on the machine. Usage: bash bench/two_at_once.sh [WORKDIR]
# Extra environment (e.g. OMP_WAIT_POLICY=ACTIVE for the old behaviour) passes through to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/gradsim-two.XXXXXX)}
mkdir -p "$work" bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
report=bench/results/two_at_once_$stamp.txt
{
  echo "# two default studies at once, started $stamp on $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GB"
  echo "# OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE (the gradsim default)} OMP_NUM_THREADS=${OMP_NUM_THREADS:-(unset)}"
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$report"
for k in a b; do
  /usr/bin/time -f "run $k: %e s wall, peak RSS %M KB, exit %x" -a -o "$report" \
    uv run main.py --setting both --computation-type gradient-similarity --output-dir "$work/$k" \
    >"$work/$k.log" 2>&1 &
done
wait || true
for k in a b; do
  grep -h "^cost\|top-1" "$work/$k.log" | sed "s/^/run $k: /" >>"$report" || true
done
cat "$report"
