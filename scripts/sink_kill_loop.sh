#!/usr/bin/env bash
# Run tests/test_sink_kill.py (SIGKILL the sink 10 times under load, then require every raw row and
# every roll-up figure exact) N times in a row, default 20; stop at the first failure and report
# how many ran and passed. Issue 16 asks for 20 in a row. Each run takes about 1.5 min on a quiet
# machine; its output is kept in $LOG_DIR/run-<i>.log (default: a new temporary directory).
#   scripts/sink_kill_loop.sh [N]
# Uses ./.venv/bin/python unless PYTHON is set; run it from anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
py="${PYTHON:-.venv/bin/python}"
logs="${LOG_DIR:-$(mktemp -d -t sink-kill-loop.XXXXXX)}"
mkdir -p "$logs"
passed=0
ran=0
for i in $(seq 1 "$n"); do
  ran=$i
  start=$(date +%s)
  if "$py" -m pytest -q -p no:cacheprovider tests/test_sink_kill.py >"$logs/run-$i.log" 2>&1; then
    passed=$((passed + 1))
    echo "run $i/$n passed in $(( $(date +%s) - start )) s"
  else
    echo "run $i/$n FAILED in $(( $(date +%s) - start )) s; its output: $logs/run-$i.log"
    grep -E "^E " "$logs/run-$i.log" | head -20
    break
  fi
done
echo "sink kill loop: ran $ran, passed $passed of $n requested (logs in $logs)"
[ "$passed" -eq "$n" ]
