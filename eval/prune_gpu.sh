#!/usr/bin/env bash
# Pruning speed on the GPU, one call: batch-1 decode of random:llama-3.2-1b (bf16) dense vs online
# (activation) pruning at every point of the SmolLM2 quality curve (docs/pruning_online.json, the
# per-layer fractions mapped by relative depth) vs 2:4 (magnitude), dense measured twice in the same
# run; then the sparse kernels' correctness check and micro-benchmark (kernel vs XLA dense dot).
# Writes $OUT/speed.json, $OUT/speed.log, $OUT/online.md, $OUT/online.png.
#
#   bash eval/prune_gpu.sh              # GPU (< 240 s on an H100)
#   SMOKE=1 bash eval/prune_gpu.sh      # CPU dry run: tiny model, kernels in the Pallas interpreter
set -euo pipefail
OUT=${OUT:-out/prune_gpu}
CURVE=${CURVE:-docs/pruning_online.json}
# the curve's allocation is uniform (every linear drops the same fraction), so the speed run needs
# only the targets; the report joins both by target when the quality curve exists
SPARSITIES=${SPARSITIES:-0.1,0.2,0.3,0.4,0.5,0.6}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  ARGS=(--smoke --new-tokens 8)
  BUDGET=100000 LIMIT=1200  # the interpreted kernels are slow on a shared CPU
else
  ARGS=(--model random:llama-3.2-1b --new-tokens 256)
  BUDGET=${BUDGET:-150} LIMIT=${LIMIT:-215}  # defaults: the whole script stays under 240 s on an H100
fi
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/speed.log"
# the decode rows first; the kernel bench only while less than $BUDGET s have gone
timeout $LIMIT python -m eval.prune_online speed "${ARGS[@]}" --sparsities "$SPARSITIES" --kernels --budget-s "$BUDGET" \
  --json "$OUT/speed.json" 2>&1 | tee -a "$OUT/speed.log" || echo "speed run ended with status $?" | tee -a "$OUT/speed.log"
if [ -f "$OUT/speed.json" ] && [ -f "$CURVE" ]; then
  python -m eval.prune_online report --curve "$CURVE" --speed "$OUT/speed.json" --markdown "$OUT/online.md" \
    --plot "$OUT/online.png" 2>&1 | tee -a "$OUT/speed.log"
fi
