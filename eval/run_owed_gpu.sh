#!/usr/bin/env bash
# The GPU measurements docs/DEVELOPING.md lists as owed, one part after another, each under its own
# time limit (seconds in brackets: the limit each part gets, compiles included), results under $OUT.
# A device call allows ~560 s, so pick the parts that fit with PARTS:
#   OUT=$OUT PARTS=spec1,train,mamba bash eval/run_owed_gpu.sh     # one call
#   OUT=$OUT PARTS=scan,quant,moe bash eval/run_owed_gpu.sh        # the next, on the warm machine
# Parts:
#   spec1  [100] issue 10: speculative part 1 (Llama-3.2-1B target; the 5-row verify now on XLA's dot)
#   train  [240] issue 8: train.bench, our step first
#   mamba  [ 90] issue 5: Mamba vs SmolLM2 decode at 32k (the row the last run missed)
#   scan   [150] issue 5: selective scan, the default and the tile layout
#   decode [170] issue 3: batch-1 decode vs HF static (on an H100 for the criterion)
#   quant  [200] issue 7: quantized decode through the int8/int4 GEMV route + the kernel table
#   moe    [200] issue 6: MoE sweep with decode blocks inside the layer, and the batch-1 profile
set -u
OUT=${OUT:-out/owed_gpu}
PARTS=${PARTS:-spec1,train,mamba,scan,decode,quant,moe}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>/dev/null
start=$SECONDS
run() {  # name, limit, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit $limit s, at $((SECONDS - start)) s)"
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "rc=$?" >> "$OUT/$name.log"
    grep -v "^[WI][0-9]\{4\}" "$OUT/$name.log" | tail -25
}
for part in ${PARTS//,/ }; do
    case $part in
        spec1) run spec1 100 python -m eval.bench_speculative --gammas 4 --medusa-target '' --real '' \
                   --pairs 'random:llama-3.2-1b=shape:smollm2-135m' --json /tmp/owed_spec1.json
               cp /tmp/owed_spec1.json "$OUT/" 2>/dev/null ;;
        train) run train 240 python -m train.bench --only peak,ours,plain --deadline 150 --json /tmp/owed_train.json
               cp /tmp/owed_train.json "$OUT/" 2>/dev/null ;;
        mamba) run mamba 90 python -m eval.decode_bench --steps 64 --contexts 32768 --out /tmp/owed_mamba.json
               cp /tmp/owed_mamba.json "$OUT/" 2>/dev/null ;;
        scan) run scan 150 python -m kernels.ssm_scan.bench --configs auto,32x8pt,32x8pts8,32x8pts16 \
                  --out /tmp/owed_scan.json
              cp /tmp/owed_scan.json "$OUT/" 2>/dev/null ;;
        decode) run decode 170 python -m eval.bench_decode --models random:llama-3.2-1b \
                    --variants scan16-gemv,scan16-xla --hf-modes static --json /tmp/owed_decode.json
                cp /tmp/owed_decode.json "$OUT/" 2>/dev/null ;;
        quant) run quant 200 python -m eval.quant_speed --model random:llama-3.2-1b --kernels --budget-s 170 \
                   --json /tmp/owed_quant.json
               cp /tmp/owed_quant.json "$OUT/" 2>/dev/null ;;
        moe) run moe 200 python -m eval.bench_moe --sweep --profile --budget 170 --out /tmp/owed_moe.json
             cp /tmp/owed_moe.json "$OUT/" 2>/dev/null ;;
        *) echo "unknown part $part (known: spec1 train mamba scan decode quant moe)"; exit 2 ;;
    esac
done
echo "run_owed_gpu.sh: $((SECONDS - start)) s"
