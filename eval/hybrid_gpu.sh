#!/usr/bin/env bash
# The GPU half of docs/hybrid.md in one call: recurrent-vs-parallel check on the device, then batch-1
# decode tokens/s and memory per sequence for 0/50/100% converted layers at 1k/8k/32k, SmolLM2-135M
# shape first, then Llama-3.2-1B's (random weights; all in one process, so ratios are same-run).
# Results: $OUT/hybrid.json (written row by row), $OUT/hybrid.log. Fits < 240 s on an H100 with
# BUDGET=150 (what is left after 150 s is skipped and listed, never half-run).
#   bash eval/hybrid_gpu.sh                                                 # GPU
#   OUT=/tmp/h CONTEXTS=64,128 STEPS=4 PER_CALL=2 DTYPE=fp32 SHAPES=smollm2-135m BUDGET=0 bash eval/hybrid_gpu.sh  # CPU dry run
set -euo pipefail
OUT=${OUT:-out/hybrid_gpu}
mkdir -p "$OUT"
PPL=${PPL:-docs/hybrid_ppl.json}
ppl_arg=()
[ -f "$PPL" ] && ppl_arg=(--ppl "$PPL")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || true
check=(--check)
[ "${CHECK:-1}" = 0 ] && check=()  # CHECK=0: skip the on-device recurrent check (tests cover it on CPU)
python -m eval.hybrid_bench "${check[@]}" --shapes "${SHAPES:-smollm2-135m,llama-3.2-1b}" \
    --contexts "${CONTEXTS:-1024,8192,32768}" --steps "${STEPS:-64}" --per-call "${PER_CALL:-16}" --dtype "${DTYPE:-bf16}" \
    --budget-s "${BUDGET:-150}" "${ppl_arg[@]}" --out "$OUT/hybrid.json" 2>&1 | tee "$OUT/hybrid.log"
