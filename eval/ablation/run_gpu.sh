#!/usr/bin/env bash
# eval.ablation's accelerator mode on one GPU within a time budget (default 225 s): speed of every
# level with random weights in SmolLM2-135M's shape and each level's formats (the student and the
# hybrid in their shapes too); quality, and the decoding levels' tokens per target pass, come from
# the CPU run committed in docs/ablation.json (each cell names its device). Results under $OUT.
#   OUT=/tmp/ablation_gpu bash eval/ablation/run_gpu.sh
# A dry run on CPU with a tiny model (the kernels rows are skipped on CPU):
#   OUT=/tmp/dry MODEL=out/tiny64 STUDENT=out/tiny64 HYBRID=out/tiny64_hybrid SMALL=1 bash eval/ablation/run_gpu.sh
set -uo pipefail
OUT=${OUT:-out/ablation_gpu}
BUDGET=${BUDGET:-225}
MODEL=${MODEL:-random:smollm2-135m}
STUDENT=${STUDENT:-eval/ablation/shapes/student-kd6.json}
HYBRID=${HYBRID:-random:smollm2-135m-hybrid50}
LEVELS=${LEVELS:-baseline,kernels,w8,kernels+w8,w4-gptq,kernels+w4-gptq,lookup,kernels+lookup,speculative,wanda-50,2:4,smoothquant,online-50,wanda-50+w4-gptq+speculative,kernels+wanda-50+w4-gptq+speculative,student,hybrid}
SIZES=()
if [ "${SMALL:-0}" = 1 ]; then
    SIZES=(--ctx 64 --chunks-per-doc 1 --calib-seqs 2 --calib-len 64 --prompt-len 16 --new-tokens 16 --prefill-batch 2
           --draft-layers 0:4:2)
fi
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}  # room for the torch peer
start=$SECONDS
left() { echo $(( BUDGET - (SECONDS - start) )); }
common=(--accelerator --model "$MODEL" --quality-from docs/ablation.json --out "$OUT" --no-progress "${SIZES[@]}")
# 1. the baseline and the HF transformers peer (static cache) first: every speedup needs both
timeout -k 5 $(( $(left) - 110 )) python -m eval.ablation "${common[@]}" --levels baseline --peers hf-static \
    2>&1 | tee "$OUT/log_baseline_peer.txt"
# 2. every level, as many as the budget allows (each finished row is saved in the json at once)
timeout -k 5 $(( $(left) - 15 )) python -m eval.ablation "${common[@]}" --levels "$LEVELS" --peers hf-static \
    --student "$STUDENT" --hybrid "$HYBRID" 2>&1 | tee "$OUT/log_levels.txt"
# 3. the table and the plot from whatever rows finished
python -m eval.ablation.report "$OUT/ablation.json" > /dev/null && cat "$OUT/ablation.md"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
echo "run_gpu.sh: $((SECONDS - start)) s of a $BUDGET s budget"
