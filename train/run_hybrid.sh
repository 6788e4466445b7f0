#!/usr/bin/env bash
# The hybrid experiment of docs/hybrid.md: SmolLM2-135M with 0 / 50 / 100% of its attention layers
# converted to Mamba mixers, the same two-stage distillation budget for each converted variant,
# validation perplexity on the Shakespeare validation plays (llama.cpp protocol, ctx 256, 16 chunks
# per play). Resumable: run it again after an interruption.
#   bash train/run_hybrid.sh OUT DATA
#   python -m eval.hybrid_bench --ppl OUT/ppl.json        # decode speed (GPU) + the README table
set -euo pipefail
OUT=${1:-out/hybrid}
DATA=${2:-../shared/data/shakespeare}
mkdir -p "$OUT"
for pct in 50 100; do
    python -m train.distill --config hybrid_align.yaml --student "train/configs/hybrid_student$pct.yaml" \
        --data "$DATA" --out "$OUT/h$pct/align"
    python -m train.distill --config hybrid_kl.yaml --student "$OUT/h$pct/align/model" \
        --data "$DATA" --out "$OUT/h$pct/kl"
done
# 0%: the hybrid is the transformer itself; KL against itself is 0 with zero gradient, so the same
# training budget leaves it unchanged: its perplexity is the teacher's.
[ -f "$OUT/h0.json" ] || python -m eval.perplexity --model smollm2-135m --data "$DATA" --split valid --ctx 256 \
    --max-chunks 16 --json "$OUT/h0.json"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ppl = {"0": json.loads((out / "h0.json").read_text())["ppl"]}
stages = {}
for pct in ("50", "100"):
    for stage in ("align", "kl"):
        stages[f"{pct}/{stage}"] = json.loads((out / f"h{pct}" / stage / "summary.json").read_text())["eval_ppl"]
    ppl[pct] = stages[f"{pct}/kl"]
rec = {"ppl": ppl, "after_stage": stages, "protocol": "llamacpp", "ctx": 256, "split": "valid", "max_chunks": 16}
(out / "ppl.json").write_text(json.dumps(rec, indent=2))
print(json.dumps(rec, indent=2))
PY
