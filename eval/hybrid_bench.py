"""Transformer vs hybrids: batch-1 decode tokens/s and memory per sequence at long context, and the README table.

    python -m eval.hybrid_bench                                    # GPU: 0/50/100% converted at 1k/8k/32k
    python -m eval.hybrid_bench --shapes smollm2-135m,llama-3.2-1b --budget-s 200 --out $OUT/hybrid.json
    python -m eval.hybrid_bench --contexts 256,1024 --steps 8 --dtype fp32   # CPU smoke run
    python -m eval.hybrid_bench --ppl out/hybrid/ppl.json          # + the perplexities of the trained models

Speed does not depend on the weights, so each variant is a real shape with random weights
(`random:smollm2-135m`, `random:smollm2-135m-hybrid50`, `-hybrid100`; the same for `llama-3.2-1b`;
the GPU machine has no GGUF reader and the trained models are too large to ship there). Each row
runs `eval.decode_bench` (cache filled as if `context` tokens had been consumed, then jitted
one-token steps, cache donated), all variants in the same process, so the speedups are same-run
ratios. `--check` first verifies, for the first shape's hybrids, that one-token recurrent decoding
reproduces the parallel forward (fp32, highest matmul precision) on the device itself. `--budget-s` skips
what is left once that many seconds have passed (rows are written to `--out` as they come).
`--ppl` is the JSON `train/run_hybrid.sh` writes ({"0": ppl, "50": ppl, "100": ppl} plus how they
were measured); it belongs to SmolLM2-135M and is merged into that shape's table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from eval.common import device_info, write_json
from eval.decode_bench import bench
from flashit_jax.errors import FlashitError, user_errors
from flashit_jax.loading import load_model
from models import configs

PERCENTS = ("0", "50", "100")


def spec(shape: str, pct: str) -> str:
    return f"random:{shape}" if pct == "0" else f"random:{shape}-hybrid{pct}"


def _ctx(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


def table(rows: list[dict], contexts, ppl: dict | None) -> str:
    """Markdown, one shape: per variant, perplexity, tokens/s (ratio to the transformer) and MiB/seq per context."""
    by = {(r["variant"], r["context"]): r for r in rows}
    lines = ["| converted | val. ppl | " + " | ".join(f"tok/s @{_ctx(c)}" for c in contexts) + " | "
             + " | ".join(f"MiB/seq @{_ctx(c)}" for c in contexts) + " |",
             "|" + " --- |" * (2 + 2 * len(contexts))]
    for v in PERCENTS:
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


def check_recurrent(name: str, prefill: int = 8, steps: int = 16) -> dict:
    """Max |logits(prefill + one-token steps) - logits(parallel forward)| / max |logits|, fp32, on this device."""
    loaded = load_model(name, "fp32")
    model, params = loaded.model, loaded.params
    t = prefill + steps
    tokens = jax.random.randint(jax.random.key(1), (1, t), 0, model.config.vocab_size, jnp.int32)
    precision = getattr(jax, "default_matmul_precision", None)  # a config context manager; absent: global setting
    if precision is None:
        jax.config.update("jax_default_matmul_precision", "highest")
    with precision("highest") if precision is not None else contextlib.nullcontext():
        full, _, _ = jax.jit(lambda p, x: model.forward(p, x))(params, tokens)
        step = jax.jit(lambda p, x, c: model.forward(p, x, cache=c))
        cache = model.init_cache(1, t, jnp.float32, params=params)
        first, cache, _ = step(params, tokens[:, :prefill], cache)
        outs = [first]
        for i in range(prefill, t):
            out, cache, _ = step(params, tokens[:, i:i + 1], cache)
            outs.append(out)
    rec = jnp.concatenate(outs, axis=1)
    err = float(jnp.max(jnp.abs(rec - full)) / jnp.max(jnp.abs(full)))
    return {"model": name, "prefill": prefill, "steps": steps, "rel_max_err": err}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.hybrid_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m", help="base shapes (models/configs.py) with -hybrid50/100")
    ap.add_argument("--variants", default="0,50,100", help="converted percentages (of 0, 50, 100)")
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--per-call", type=int, default=1, help="decode steps per jitted call (lax.scan; 1: one call a token)")
    ap.add_argument("--check", action="store_true", help="recurrent vs parallel logits of the first shape's hybrids")
    ap.add_argument("--check-tol", type=float, default=1e-3)
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip what is left after this many seconds (0: none)")
    ap.add_argument("--ppl", default=None, help="JSON of SmolLM2-135M validation perplexities (train/run_hybrid.sh)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with user_errors("eval.hybrid_bench"):
        variants = [v.strip().rstrip("%") for v in args.variants.split(",") if v.strip()]
        bad = [v for v in variants if v not in PERCENTS]
        if bad:
            raise FlashitError(f"unknown variants {bad}; choose from {list(PERCENTS)} (percent converted)")
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        missing = [spec(s, v) for s in shapes for v in variants if spec(s, v)[len("random:"):] not in configs.SHAPES]
        if missing:
            raise FlashitError(f"no registered shape for {missing} (models/__init__.py registers the hybrids)")
        try:
            contexts = [int(c) for c in args.contexts.split(",")]
        except ValueError:
            raise FlashitError(f"--contexts must be integers, got {args.contexts!r}") from None
        if args.steps < 1 or args.per_call < 1 or any(c < 1 for c in contexts):
            raise FlashitError("--steps, --per-call and every context must be >= 1")
        ppl = None
        if args.ppl:
            p = Path(args.ppl)
            if not p.exists():
                raise FlashitError(f"--ppl {p}: no such file")
            ppl = {k: float(v) for k, v in json.loads(p.read_text()).get("ppl", {}).items()}
        args.steps = -(-args.steps // args.per_call) * args.per_call  # what bench() runs
        info = device_info()
        rec = {**info, "dtype": args.dtype, "steps": args.steps, "per_call": args.per_call, "checks": [], "rows": [], "skipped": [],
               "ppl": ppl, "tables": {}}

        def over_budget():
            return args.budget_s > 0 and time.perf_counter() - t0 > args.budget_s

        if args.check:  # the first shape's hybrids: the check is about the code path, not the size
            for s in shapes[:1]:
                for v in variants:
                    if v != "0":
                        c = check_recurrent(spec(s, v))
                        c["ok"] = c["rel_max_err"] <= args.check_tol
                        print(json.dumps(c), flush=True)
                        rec["checks"].append(c)
                        write_json(args.out, rec)
        for s in shapes:
            for v in variants:
                if over_budget():
                    rec["skipped"].append(spec(s, v))
                    continue
                for r in bench(spec(s, v), contexts, args.steps, args.dtype, args.per_call):
                    rec["rows"].append({"shape": s, "variant": v, **r})
                    write_json(args.out, rec)
    print(f"\nbatch-1 decode, {args.dtype}, {args.steps} steps ({args.per_call} per call), {info['device']}, {info['date']}, jax {info['jax_version']}"
          f"\n(ratios: tokens/s over the transformer's at the same context, same run)")
    for c in rec["checks"]:
        print(f"check {c['model']}: recurrent vs parallel rel. max err {c['rel_max_err']:.2e} ({'ok' if c['ok'] else 'FAIL'})")
    for s in shapes:
        rec["tables"][s] = table([r for r in rec["rows"] if r["shape"] == s], contexts,
                                 ppl if s == "smollm2-135m" else None)
        print(f"\n{s}\n{rec['tables'][s]}")
    if rec["skipped"]:
        print(f"\nskipped (over --budget-s {args.budget_s:g}): {', '.join(rec['skipped'])}")
    rec["wall_s"] = time.perf_counter() - t0
    write_json(args.out, rec)
    if any(not c["ok"] for c in rec["checks"]):
        raise SystemExit(1)
    return rec["rows"]


if __name__ == "__main__":
    main()
