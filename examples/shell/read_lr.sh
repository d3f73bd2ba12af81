#!/usr/bin/env bash
# Print the learning rate autolr wants for a run, from any language or shell:
#
#     examples/shell/read_lr.sh RUN_DIR BASE_LR        # e.g. LR=$(read_lr.sh runs/exp1 3e-4)
#
# The control file RUN_DIR/autolr.json (or the file itself) holds `lr` (absolute, or null when
# the daemon knows no base LR) and `scale` (the multiplier for your own base LR). This prints
# `lr` when it is set, else BASE_LR x scale, and BASE_LR before the daemon's first decision.
# The file is replaced atomically, so a read never sees a partial file.
#
# Uses jq when installed, else `python3 -c`; force one with AUTOLR_READER=jq|python
# (PYTHON picks the interpreter).
set -euo pipefail
run=${1:?usage: read_lr.sh RUN_DIR BASE_LR}
base=${2:?usage: read_lr.sh RUN_DIR BASE_LR}
file=$run
[ -d "$run" ] && file=$run/autolr.json
if [ ! -f "$file" ]; then
    echo "$base"  # no decision yet
    exit 0
fi
reader=${AUTOLR_READER:-}
if [ -z "$reader" ]; then
    if command -v jq >/dev/null 2>&1; then reader=jq; else reader=python; fi
fi
case $reader in
    jq)
        jq -r --argjson base "$base" 'if .lr != null then .lr else .scale * $base end' "$file" ;;
    python)
        "${PYTHON:-python3}" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(r["lr"] if r["lr"] is not None else r["scale"] * float(sys.argv[2]))' "$file" "$base" ;;
    *)
        echo "read_lr.sh: AUTOLR_READER must be jq or python, not '$reader'" >&2
        exit 2 ;;
esac
