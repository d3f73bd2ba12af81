#!/usr/bin/env bash
# A non-Python "training loop" steered live by autolr: bash examples/shell/train.sh [RUN_DIR]
#
# Starts `autolr watch RUN_DIR` in the background, then loops: reads the LR with read_lr.sh
# (jq, or python -c) whenever autolr.json changed, does a fake training step (awk), appends a
# JSONL line {"step", "loss", "lr"} that the daemon tails, and prints each LR change it applied.
# The daemon's step policy halves the LR every 40 steps. Stops the daemon on exit.
#
# Two-terminal form: run `autolr watch RUN_DIR --policy step:step_size=40,gamma=0.5 --base-lr 0.1`
# yourself and set NO_DAEMON=1. Environment: STEPS (default 200), AUTOLR_READER=jq|python,
# PYTHON (interpreter for the fallback and for `python -m autolr.cli` when `autolr` is not on PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=${1:-$(mktemp -d "${TMPDIR:-/tmp}/autolr-shell-XXXXXX")}
steps=${STEPS:-200}
base_lr=0.1
mkdir -p "$run"
: >>"$run/metrics.jsonl"  # the run is recognised by its log

if [ -z "${NO_DAEMON:-}" ]; then
    if command -v autolr >/dev/null 2>&1; then cmd=(autolr); else cmd=("${PYTHON:-python3}" -m autolr.cli); fi
    daemon_log=$(mktemp "${TMPDIR:-/tmp}/autolr-watch-XXXXXX")  # outside the run: not a training log
    "${cmd[@]}" watch "$run" --policy step:step_size=40,gamma=0.5 --base-lr "$base_lr" --no-fsync \
        >"$daemon_log" 2>&1 &
    daemon=$!
    trap 'kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null; echo "daemon output: $daemon_log"' EXIT
fi
for _ in $(seq 1500); do  # up to 30 s for the daemon to publish the initial value
    [ -f "$run/autolr.json" ] && break
    sleep 0.02
done
[ -f "$run/autolr.json" ] || { echo "no $run/autolr.json: is autolr watch running?" >&2; exit 1; }

key=none lr=$base_lr applied=none loss=1.0
for ((step = 0; step < steps; step++)); do
    # Re-read only when the file changed: an atomic replace gives a new inode, mtime (ns), size.
    k=$(stat -c '%i:%.9Y:%s' "$run/autolr.json" 2>/dev/null) || k=$step
    if [ "$k" != "$key" ]; then
        key=$k
        lr=$("$here/read_lr.sh" "$run" "$base_lr")
    fi
    if [ "$lr" != "$applied" ]; then
        echo "step $step: lr $lr"
        applied=$lr
    fi
    loss=$(awk -v l="$loss" -v lr="$lr" -v s="$step" \
        'BEGIN { printf "%.6f", l * (1 - 0.05 * lr) + 0.01 * ((s * 7919) % 13) / 13 }')
    printf '{"step": %d, "loss": %s, "lr": %s}\n' "$step" "$loss" "$lr" >>"$run/metrics.jsonl"
    sleep 0.01  # stands in for real work
done
echo "done: $steps steps, final lr $lr, run folder $run"
