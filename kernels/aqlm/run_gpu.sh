#!/usr/bin/env bash
# One GPU call: AQLM lookup kernel checks + timings vs XLA (dequant+dot, LUT) and bf16, results under $OUT.
# Ship: rm -rf /work/main/.dev/issue12a && mkdir -p /work/main/.dev/issue12a && git -C /work/wt/issue12a archive HEAD | tar -x -C /work/main/.dev/issue12a
# Run (carry [".dev/issue12a"]):  cd .dev/issue12a && export PYTHONPATH=$PWD && bash kernels/aqlm/run_gpu.sh
# CPU dry run (interpreter, tiny shapes): SMOKE=1 OUT=/tmp/aq bash kernels/aqlm/run_gpu.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || true
timeout 220 python -m kernels.aqlm.bench ${SMOKE:+--smoke} --json "$OUT/aqlm_bench.json" 2>&1 | tee "$OUT/aqlm_bench.log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/aqlm_bench.log"
