#!/usr/bin/env bash
# The GPU measurements docs/DEVELOPING.md lists as owed, one part after another, each under its own
# time limit (seconds in brackets: the limit each part gets, compiles included), results under $OUT.
# A device call allows ~560 s, so pick the parts that fit with PARTS. Owed after session 10 (docs/DEVELOPING.md):
#   OUT=$OUT PARTS=train,scan2 bash eval/run_owed_gpu.sh              # issues 8 and 5 (530 s)
#   OUT=$OUT PARTS=quant,profile bash eval/run_owed_gpu.sh            # issue 7
#   OUT=$OUT PARTS=gemvfix bash eval/run_owed_gpu.sh                  # issue 7 (writes kernels/gemv/tuned.json)
#   OUT=$OUT PARTS=decode bash eval/run_owed_gpu.sh                   # issue 3, on an H100
#   OUT=$OUT PARTS=attnfull bash eval/run_owed_gpu.sh                 # issue 4 (closed; carry out/whl_tk)
#   OUT=$OUT PARTS=scan5 bash eval/run_owed_gpu.sh                    # issue 5 (done in session 12 on an H100)
#   OUT=$OUT PARTS=scan13 bash eval/run_owed_gpu.sh                   # issue 5's table (done in session 13 on an H100)
# Parts:
#   fuse14  [200+80+90+120] issue 7 (done in session 14 on an H100): decode with the rotary + KV write kernel and the
#                 in-kernel K-split sums (bf16, w8+emb8), both profiled, then the rows under XLA's CUDA graphs
#   scan13  [450] issue 5: the split-tile default, session 12's default, the sequential kernel, associative_scan and
#                 lax.scan, forward and forward + backward, checked at the bench shape (the table)
#   scan5   [300] issue 5: the chunk-parallel forward with the state carried into the scan, warps 1/2/4, and the
#                 issue's table (associative_scan, lax.scan, forward and forward + backward)
#   gemvwide [170] issues 3, 7: GEMV tiles over the wide grid (bf16, tied head, int8), written to tuned.json
#   moe     [170] issue 6: eval.bench_moe in one run with tokamax beside ours (its wheels in out/whl_tk, carried)
#   train   [250] issue 8: train.bench peak, ours, ours-fused, plain, distill, and
#                 ours under the profiler
#   gemvconv [100] issue 7: GEMVs with one setting flipped, same blocks, one run: int-to-float by bit pattern vs
#                 the conversion instruction (i8, 4-bit), next tile prefetched or not (bf16, i8) (done 2026-12-05)
#   quant   [280] issue 7: quantized decode, warmed rows: bf16, int8 and 4-bit on the GEMV route, each with the
#                 rotary + KV write kernel (:rope); the fixed in-kernel K-split sum (:fixup)
#   gemvfix [90+120+200] issue 7: the GEMV GPU tests (the in-kernel split sum's atomics for real), each decode GEMV with its K splits summed by XLA vs in the kernel (Blocks.fixup),
#                 same blocks, one run; then the int8 tiles re-tuned with fixup on (written to tuned.json)
#   scan2   [280] issue 5: the chunk-parallel forward (GpuBlocks.parallel: each chunk scanned along time with
#                 Triton's scan, flag c) and the tile layout with 8-16 channels per program, beside auto, then the
#                 best one's forward + backward beside associative_scan and lax.scan (the table, one run)
#   attndec [200] issue 4: decode attention timed back to back, with the flash-decoding tile sweep
#   attnbwd [440] issue 4: the Mosaic GPU backward compiled: its GPU tests (pairwise, 9 cases) [240], then the
#                 prefill bench, ours (Mosaic fwd+bwd) beside Mosaic fwd + Triton bwd, cuDNN and tokamax [200]
#   attnbench [100+170+130] issue 4: the 4 non-causal Mosaic GPU test cases (not yet run on a GPU), the prefill
#                 bench, and the decode table with the tile sweep (one-wave grid default since 2026-12-05)
#   attnfull [300] issue 4: the whole attention bench in one run (every implementation on the headline cases,
#                 the decode table, the other cases against cuDNN and tokamax)
#   profile [90+110] issues 3, 7: eval.profile_decode, bf16 then w8+emb8 (kernels per step and their time)
#   mamba   [150] issue 5: Mamba vs SmolLM2 decode at 1k, 8k and 32k in one run (16 steps per call: the
#                 one-call-per-token figures of session 5/6 moved 509 -> 692 between runs)
#   scan    [170] issue 5: the scan's tile layout with the state split over more warps (wN: N across lanes, one
#                 pass, half the exponentials of the segmented default), beside auto; XLA alternatives skipped
#   decode  [170] issue 3: batch-1 decode vs HF static (on an H100 for the criterion)
#   spec1   [100] (issue 10, closed) speculative part 1 with the 5-row verify on XLA's dot
set -u
OUT=${OUT:-out/owed_gpu}
PARTS=${PARTS:-gemvwide,decode,quant,moe,train,attndec,mamba}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>/dev/null
start=$SECONDS
if ls out/whl_tk/*.whl >/dev/null 2>&1; then  # tokamax and what it lacks there (docs/DEVELOPING.md), plus an xprof stub
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site out/whl_tk/*.whl > "$OUT/pip_tk.log" 2>&1
    mkdir -p /tmp/xstub/xprof/cli/tools && touch /tmp/xstub/xprof/__init__.py /tmp/xstub/xprof/cli/__init__.py
    printf 'def get_kernel_stats_tool(*a, **k):\n    raise NotImplementedError("xprof stub")\n' > /tmp/xstub/xprof/cli/tools/__init__.py
    export PYTHONPATH=$PWD:/tmp/site:/tmp/xstub${PYTHONPATH:+:$PYTHONPATH}
fi
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
        gemvwide) run gemvwide 170 python -m kernels.gemv.bench --tune --grid wide --weights bf16,t,i8 \
                      --models llama-3.2-1b --write --json /tmp/owed_gemvwide.json
                  cp /tmp/owed_gemvwide.json kernels/gemv/tuned.json "$OUT/" 2>/dev/null ;;
        moe) run moe 170 python -m eval.bench_moe --budget 140 --out /tmp/owed_moe.json
             cp /tmp/owed_moe.json "$OUT/" 2>/dev/null ;;
        train) run train 250 python -m train.bench --only peak,ours,ours-fused,plain,distill --profile --deadline 180 \
                   --json /tmp/owed_train.json
               cp /tmp/owed_train.json "$OUT/" 2>/dev/null ;;
        gemvconv) run gemvconv 100 python -m kernels.gemv.bench --weights bf16,i8,u4g128 --models llama-3.2-1b --json /tmp/owed_gemvconv.json
                  cp /tmp/owed_gemvconv.json "$OUT/" 2>/dev/null ;;
        quant) run quant 280 python -m eval.quant_speed --model random:llama-3.2-1b --budget-s 250 --json /tmp/owed_quant.json \
                   --variants "bf16,w8+emb8,w8+emb8:rope,bf16:rope,w4g128+emb8,w4g128+emb8:rope,w8+emb8:fixup"
               cp /tmp/owed_quant.json "$OUT/" 2>/dev/null ;;
        fixq) # the fixed in-kernel K-split sum, verified then timed (done 2026-12-05, session 11)
              run fixq_tests 80 python -m pytest tests/test_gemv.py -q -k "on_gpu"
              run fixq 200 python -m eval.quant_speed --model random:llama-3.2-1b --budget-s 180 --json /tmp/owed_fixq.json \
                  --variants "bf16,w8+emb8,w8+emb8:fixup,w8+emb8:rope"
              cp /tmp/owed_fixq.json "$OUT/" 2>/dev/null ;;
        scan13) run scan13 450 python -m kernels.ssm_scan.bench --alternatives associative,reference --reps 5 \
                    --no-multihead-check --bwd auto,sequential --configs auto,16x16pck8j32w2,sequential,auto \
                    --out /tmp/owed_scan13.json
                cp /tmp/owed_scan13.json "$OUT/" 2>/dev/null ;;
        scan5) # issue 5 on an H100: the state carried into each chunk's scan (default) vs the session-11 carry (o),
               # 1 vs 2 vs 4 warps, next chunk's loads issued ahead (p) or not, beside the sequential kernel,
               # associative_scan and lax.scan (the table)
               run scan5 300 python -m kernels.ssm_scan.bench --alternatives associative,reference --reps 5 \
                   --bwd auto,sequential --configs auto,16x16cok8j32w2,8x16ck8j32w1,16x16pck8j32w2,8x16pck8j32w1,\
32x16pck8j32w4,16x16ck8j32w4,sequential --out /tmp/owed_scan5.json
               cp /tmp/owed_scan5.json "$OUT/" 2>/dev/null ;;
        scan3) run scan3 180 python -m kernels.ssm_scan.bench --alternatives "" --no-check --reps 5 \
                   --configs auto,16x16ck8,16x32ck8,32x16ck8,16x16ck8w2,16x16ck8w4,32x16ck8w2,32x16ck8w4,8x16ck8w2,16x8cw2,32x8cw2,16x32ck8w2,\
16x32ck8w4,16x16ck8s2,16x16ck8s4,8x16ck8s4,16x8cs4,16x16ck8s8,32x16ck8s4w2,16x16ck8s2w2,16x16ck8s4w2,8x8cs4,8x8cs8,16x8cs8w2 \
                   --out /tmp/owed_scan3.json
               cp /tmp/owed_scan3.json "$OUT/" 2>/dev/null ;;
        scan4) run scan4 190 python -m kernels.ssm_scan.bench --alternatives associative,reference --reps 5 --bwd auto \
                   --configs auto,16x16ck8j32w2,16x16ck8w2,16x16ck8j32,8x16ck8j32w2,32x16ck8j32w2,16x8cj32w2,16x16ck8j32s2w2 \
                   --out /tmp/owed_scan4.json
               cp /tmp/owed_scan4.json "$OUT/" 2>/dev/null ;;
        trainab) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
                     run trainab_notriton 100 python -m train.bench --only peak,ours --json /tmp/owed_trainab_nt.json
                 run trainab_prof 150 python -m train.bench --only peak,ours --profile --json /tmp/owed_trainab.json
                 cp /tmp/owed_trainab.json /tmp/owed_trainab_nt.json "$OUT/" 2>/dev/null ;;
        scanfull) run scanfull 330 python -m kernels.ssm_scan.bench --alternatives associative,reference --reps 5 \
                      --configs auto,16x16ck8,16x32ck8,32x16ck8,16x16ck8w2,16x16ck8w4,32x16ck8w2,8x16ck8w2,16x32ck8w2,\
16x16ck8s2,16x16ck8s4,8x16ck8s4,16x16ck8s8,16x16ck8s2w2,16x16ck8s4w2,8x8cs8 --out /tmp/owed_scanfull.json
                  cp /tmp/owed_scanfull.json "$OUT/" 2>/dev/null ;;
        trainprof) run trainprof 230 python -m train.bench --only peak,ours,plain --profile --deadline 170 \
                       --json /tmp/owed_trainprof.json
                   cp /tmp/owed_trainprof.json "$OUT/" 2>/dev/null ;;
        gemvfix)
                 run gemvfix_tests 90 python -m pytest tests/test_gemv.py -q -k "on_gpu"
                 run gemvfix 120 python -m kernels.gemv.bench --weights bf16,i8,u4g128 --models llama-3.2-1b \
                     --json /tmp/owed_gemvfix.json
                 run gemvfixtune 200 python -m kernels.gemv.bench --tune --grid fixup --weights i8 --models llama-3.2-1b \
                     --write --json /tmp/owed_gemvfixtune.json
                 cp /tmp/owed_gemvfix.json /tmp/owed_gemvfixtune.json kernels/gemv/tuned.json "$OUT/" 2>/dev/null ;;
        scan2) run scan2 280 python -m kernels.ssm_scan.bench --alternatives associative,reference --reps 5 \
                   --out /tmp/owed_scan2.json \
                   --configs auto,16x8c,8x8c,32x8c,16x16c,8x16c,16x8cw8,32x16cw8,8x8pt,16x8pt,8x8pts2,16x8pts2
               cp /tmp/owed_scan2.json "$OUT/" 2>/dev/null ;;
        attndec) run attndec 200 python -m kernels.attention.bench --only decode --decode-sweep --budget-s 170 --out /tmp/owed_attn
                 cp /tmp/owed_attn/bench.json "$OUT/owed_attn_decode.json" 2>/dev/null ;;
        attnbwd) run attnbwd_tests 240 python -m pytest tests/test_attention_gpu.py -k "test_mosaic_gpu and not test_mosaic_gpu_full" -x -q
                 run attnbwd 200 python -m kernels.attention.bench --only prefill --impls mosaic,cudnn \
                     --budget-s 165 --out /tmp/owed_attnbwd
                 cp /tmp/owed_attnbwd/bench.json "$OUT/owed_attn_prefill.json" 2>/dev/null ;;
        attnfull) run attnfull 300 python -m kernels.attention.bench --budget-s 250 --out /tmp/owed_attnfull
                  cp /tmp/owed_attnfull/bench.json "$OUT/owed_attn_full.json" 2>/dev/null ;;
        attnbench) run attnfull_tests 100 python -m pytest tests/test_attention_gpu.py -q \
                       -k "test_mosaic_gpu and full and not test_mosaic_gpu_full"
                   run attnprefill 170 python -m kernels.attention.bench --only prefill --impls mosaic,cudnn \
                       --budget-s 140 --out /tmp/owed_attnprefill
                   cp /tmp/owed_attnprefill/bench.json "$OUT/owed_attn_prefill.json" 2>/dev/null
                   run attndecode 130 python -m kernels.attention.bench --only decode --decode-sweep --budget-s 110 \
                       --out /tmp/owed_attndecode
                   cp /tmp/owed_attndecode/bench.json "$OUT/owed_attn_decode.json" 2>/dev/null ;;
        fuse14) # issue 7 (session 14): the step with fewer kernels (rotary + KV write kernel, K splits summed in
                # the GEMVs, which also take the residual adds), timed and profiled; then XLA's CUDA graphs over
                # the scan's while loop, to see what the ~2 us between kernels is
                run fuse14 200 python -m eval.quant_speed --model random:llama-3.2-1b --budget-s 170 \
                    --json /tmp/owed_fuse14.json --variants "bf16,bf16:rope:fixup,w8+emb8,w8+emb8:rope:fixup"
                cp /tmp/owed_fuse14.json "$OUT/" 2>/dev/null
                FLASHIT_JAX_ROPE_KERNEL=1 FLASHIT_JAX_GEMV_FIXUP=1 run profile_bf16_fused 80 python -m eval.profile_decode
                FLASHIT_JAX_ROPE_KERNEL=1 FLASHIT_JAX_GEMV_FIXUP=1 run profile_w8_fused 90 python -m eval.profile_decode --recipe w8+emb8
                XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1" \
                    run fuse14_graphs 120 python -m eval.quant_speed --model random:llama-3.2-1b --budget-s 100 \
                    --json /tmp/owed_fuse14g.json --variants "bf16,w8+emb8,w8+emb8:rope:fixup"
                cp /tmp/owed_fuse14g.json "$OUT/" 2>/dev/null ;;
        profile) run profile_bf16 90 python -m eval.profile_decode
                 run profile_w8 110 python -m eval.profile_decode --recipe w8+emb8 ;;
        mamba) run mamba 150 python -m eval.decode_bench --steps 64 --per-call 16 --out /tmp/owed_mamba.json
               cp /tmp/owed_mamba.json "$OUT/" 2>/dev/null ;;
        scan) run scan 170 python -m kernels.ssm_scan.bench --alternatives "" \
                  --configs auto,32x8tw4,32x8ptw4,32x8tw2,64x8tw4,64x8ptw8,32x16tw4,32x8pts4w4 --out /tmp/owed_scan.json
              cp /tmp/owed_scan.json "$OUT/" 2>/dev/null ;;
        decode) run decode 170 python -m eval.bench_decode --models random:llama-3.2-1b \
                    --variants scan16-gemv,scan16-xla --hf-modes static --json /tmp/owed_decode.json
                cp /tmp/owed_decode.json "$OUT/" 2>/dev/null ;;
        spec1) run spec1 100 python -m eval.bench_speculative --gammas 4 --medusa-target '' --real '' \
                   --pairs 'random:llama-3.2-1b=shape:smollm2-135m' --json /tmp/owed_spec1.json
               cp /tmp/owed_spec1.json "$OUT/" 2>/dev/null ;;
        *) echo "unknown part $part (known: gemvwide gemvconv moe train quant attndec attnbwd attnbench attnfull profile mamba scan decode spec1)"; exit 2 ;;
    esac
done
echo "run_owed_gpu.sh: $((SECONDS - start)) s"
