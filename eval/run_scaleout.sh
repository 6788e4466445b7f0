#!/usr/bin/env bash
# Scale-out figures on a 2-GPU machine in one call (~3-4 minutes; BUDGET=280 caps it under 300 s), results under $OUT/scaleout:
#   cd .dev/issue14 && export PYTHONPATH=$PWD && bash eval/run_scaleout.sh
# results.md (tables), results.json, <part>.json (rows as they came), log.txt.
# BUDGET (seconds, default 280) is shared by the three parts; each part is a process with its own limit.
set -u
OUT=${OUT:-out}
DEST="$OUT/scaleout"
mkdir -p "$DEST"
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi -L 2>&1 | tee "$DEST/gpus.txt" || true
python -m eval.bench_scaleout --devices "${DEVICES:-1,2}" --budget "${BUDGET:-280}" --out "$DEST" "$@" 2>&1 \
    | tee "$DEST/log.txt"
exit "${PIPESTATUS[0]}"
