#!/usr/bin/env bash
# One GPU session for the ternary (BitNet b1.58) matmul: the kernel checked against the XLA
# reference on the GPU, then timed against XLA bf16 (ratios measured in the same run).
#   OUT=out bash kernels/ternary/run_gpu.sh          (< 240 s on an H100; logs and JSON in $OUT)
#   SMOKE=1 OUT=/tmp/t bash kernels/ternary/run_gpu.sh   (CPU dry run: tiny shapes, Pallas interpreter)
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 200 python3 -m kernels.ternary.bench --out "$OUT" --budget-s 150 ${SMOKE:+--smoke} 2>&1 | tee "$OUT/ternary_bench.log"
echo "bench rc=${PIPESTATUS[0]}"
