#!/usr/bin/env bash
# The README/docs experiment: the same 6-layer student (SmolLM2-135M layers 0,6,12,18,24,29)
# trained for the same steps with KD (mix: 0.5 CE + 0.5 T^2-scaled soft targets, T=2) and with
# cross-entropy only; then both curves in one figure.
#   bash train/run_kd_vs_ce.sh [OUT_ROOT] [DATA]
set -euo pipefail
OUT=${1:-out/kd_vs_ce}
DATA=${2:-../shared/data/shakespeare}
python -m train.distill --config distill_shakespeare.yaml --data "$DATA" --out "$OUT/kd"
python -m train.distill --config distill_shakespeare.yaml --data "$DATA" --loss ce --out "$OUT/ce"
python -m train.plot "$OUT/kd" "$OUT/ce" --labels "KD: 0.5 CE + 0.5 soft targets (T=2)" "CE only" \
  --out "$OUT/kd_vs_ce.png" \
  --title "6-layer student from SmolLM2-135M layers, Shakespeare train plays -> valid plays (ctx 256)"
