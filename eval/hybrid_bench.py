"""Transformer vs hybrids: batch-1 decode tokens/s and memory per sequence at long context, and the README table.

    python -m eval.hybrid_bench                                    # GPU: 0/50/100% converted at 1k/8k/32k
    python -m eval.hybrid_bench --contexts 256,1024 --steps 8 --dtype fp32   # CPU smoke run
    python -m eval.hybrid_bench --ppl out/hybrid/ppl.json          # + the perplexities of the trained models

Speed does not depend on the weights, so each variant is SmolLM2-135M's shape with random weights
(`random:smollm2-135m`, `-hybrid50`, `-hybrid100`; the GPU machine has no GGUF reader and the
trained models are too large to ship there). Each row runs `eval.decode_bench` (cache filled as if
`context` tokens had been consumed, then jitted one-token steps, cache donated), all variants in the
same process, so the speedups are same-run ratios. `--ppl` is the JSON `train/run_hybrid.sh` writes
({"0": ppl, "50": ppl, "100": ppl} plus how they were measured), merged into the table as given.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.common import device_info, write_json
from eval.decode_bench import bench
from flashit_jax.errors import FlashitError, user_errors

VARIANTS = {"0": "random:smollm2-135m", "50": "random:smollm2-135m-hybrid50", "100": "random:smollm2-135m-hybrid100"}


def _ctx(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


def table(rows: list[dict], contexts, ppl: dict | None) -> str:
    """Markdown: per variant, perplexity, tokens/s (and the ratio to the transformer) and MiB/seq per context."""
    by = {(r["variant"], r["context"]): r for r in rows}
    lines = ["| converted | val. ppl | " + " | ".join(f"tok/s @{_ctx(c)}" for c in contexts) + " | "
             + " | ".join(f"MiB/seq @{_ctx(c)}" for c in contexts) + " |",
             "|" + " --- |" * (2 + 2 * len(contexts))]
    for v in VARIANTS:
        if not any((v, c) in by for c in contexts):
            continue
        speed, mem = [], []
        for c in contexts:
            r, base = by.get((v, c)), by.get(("0", c))
            ratio = f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if r and base and v != "0" else ""
            speed.append(f"{r['tokens_per_s']:.1f}{ratio}" if r else "")
            mem.append(f"{r['cache_MiB_per_seq']:.1f}" if r else "")
        p = f"{ppl[v]:.2f}" if ppl and v in ppl else ""
        lines.append(f"| {v}% | {p} | " + " | ".join(speed) + " | " + " | ".join(mem) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.hybrid_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="0,50,100", help="converted percentages (of 0, 50, 100)")
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ppl", default=None, help="JSON of validation perplexities by percentage (train/run_hybrid.sh)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with user_errors("eval.hybrid_bench"):
        variants = [v.strip().rstrip("%") for v in args.variants.split(",") if v.strip()]
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            raise FlashitError(f"unknown variants {bad}; choose from {list(VARIANTS)} (percent converted)")
        try:
            contexts = [int(c) for c in args.contexts.split(",")]
        except ValueError:
            raise FlashitError(f"--contexts must be integers, got {args.contexts!r}") from None
        if args.steps < 1 or any(c < 1 for c in contexts):
            raise FlashitError("--steps and every context must be >= 1")
        ppl = None
        if args.ppl:
            p = Path(args.ppl)
            if not p.exists():
                raise FlashitError(f"--ppl {p}: no such file")
            ppl = {k: float(v) for k, v in json.loads(p.read_text()).get("ppl", {}).items()}
        rows = []
        for v in variants:
            for r in bench(VARIANTS[v], contexts, args.steps, args.dtype):
                rows.append({"variant": v, **r})
    info = device_info()
    text = table(rows, contexts, ppl)
    print(f"\nbatch-1 decode, {args.dtype}, {args.steps} steps, {info['device']}, {info['date']}, jax {info['jax_version']}"
          f"\n(ratios: tokens/s over the transformer's at the same context, same run)\n")
    print(text)
    write_json(args.out, {**info, "dtype": args.dtype, "steps": args.steps, "rows": rows, "ppl": ppl, "table": text})
    return rows


if __name__ == "__main__":
    main()
