"""Online (activation) pruning: sparsity -> (Δ perplexity, decode speedup), plus 2:4 decode speed.

    # 1. quality (any device; CPU is fine): per-layer thresholds calibrated on SmolLM2-135M
    python -m eval.prune_online curve --model smollm2-135m --out docs/pruning_online.json
    # 2. speed (GPU): the per-layer fractions of every curve point, mapped by relative depth onto
    #    random:llama-3.2-1b, batch-1 decode vs dense in the same run; 2:4 (magnitude) vs dense too
    python -m eval.prune_online speed --curve docs/pruning_online.json --json OUT/speed.json
    python -m eval.prune_online speed --sparsities 0.1,0.2,0.3,0.4,0.5,0.6 --json OUT/speed.json  # uniform: same fractions
    python -m eval.prune_online speed --smoke              # CPU, tiny model (tests the script)
    # 3. the table and plot from both
    python -m eval.prune_online report --curve docs/pruning_online.json --speed OUT/speed.json \\
        --markdown docs/pruning_online.md --plot docs/pruning_online.png

Thresholds (flashit_jax.prune.online): each linear drops the inputs whose |x| is at or below the
`fraction` quantile of its calibration activations. The speed run recalibrates the thresholds
on the target model itself (random weights: its own activation statistics), so the *fraction*
of inputs skipped per layer is the one that produced the quality point; the decode kernel
(kernels.sparse_matmul) then reads only the weight rows of the surviving inputs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from flashit_jax.errors import FlashitError, user_errors

DEFAULT_SPARSITIES = "0.1,0.2,0.3,0.4,0.5,0.6"


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise FlashitError(f"expected comma-separated numbers, got {s!r}") from None


def curve(args) -> dict:
    from eval.common import device_info, setup_jax, write_json
    from eval.perplexity import evaluate
    from eval.prune import calibration_tokens_for
    from flashit_jax.data import load_documents
    from flashit_jax.loading import load_model
    from flashit_jax.prune import online

    setup_jax()
    targets = [online.check_sparsity(s) for s in _floats(args.sparsities)]
    loaded = load_model(args.model, "fp32")
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    docs = load_documents(args.data, args.split)
    calib = calibration_tokens_for(tok, args.calib, "train", args.calib_seqs, args.calib_len, args.seed)
    held = calibration_tokens_for(tok, args.data, args.split, 4, args.calib_len, args.seed)
    t0 = time.perf_counter()
    stats = online.activation_stats(model, params, calib, progress=True)
    stats_s = time.perf_counter() - t0

    def ppl(p):
        return evaluate(model, p, tok, docs, ctx=args.ctx, max_chunks=args.max_chunks, batch_size=args.batch_size)

    base = ppl(params)
    res = {"model": args.model, "data": f"{args.data}:{args.split}", "ctx": args.ctx, "n_chunks": base["n_chunks"],
           "calibration": {"data": f"{args.calib}:train", "sequences": args.calib_seqs, "seq_len": args.calib_len},
           "allocation": "uniform: every linear drops the same fraction of its inputs", "stats_s": stats_s,
           "baseline_ppl": base["ppl"], **device_info(), "points": []}
    print(f"dense: ppl {base['ppl']:.4f}")
    for s in targets:
        fr = online.uniform_fractions(stats, s)
        sp = online.online_prune(params, online.thresholds(stats, fr))
        rep = ppl(sp)
        measured = online.measured_fractions(model, sp, held)
        pt = {"target": s, "fractions": fr, "ppl": rep["ppl"], "delta_pct": 100 * (rep["ppl"] / base["ppl"] - 1),
              "held_out_fraction": float(np.mean(list(measured.values())))}
        res["points"].append(pt)
        print(f"sparsity {s:.2f}: ppl {rep['ppl']:.4f} ({pt['delta_pct']:+.2f}%), dropped on held-out text "
              f"{100 * pt['held_out_fraction']:.1f}%", flush=True)
        write_json(args.out, res)
    return res


def _smoke_model():
    import jax
    import jax.numpy as jnp

    from models import Model
    from models.llama import LlamaConfig

    model = Model(LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                              tie_embeddings=True))
    return model, model.init_params(jax.random.key(0), jnp.bfloat16)


def speed(args) -> dict:
    import jax

    from eval.common import device_info, write_json
    from flashit_jax.generate import generate
    from flashit_jax.nn.sparse import sparse_impl
    from flashit_jax.prune import online, prune

    t_start = time.perf_counter()
    lines: list[str] = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(json.dumps(device_info()))
    report = {"device": device_info(), "model": "smoke" if args.smoke else args.model, "decode": []}
    if args.curve:
        pts = json.loads(Path(args.curve).read_text())["points"]
    elif args.sparsities:  # `curve`'s uniform allocation: every linear drops the same fraction
        pts = [{"target": s, "fractions": None} for s in map(online.check_sparsity, _floats(args.sparsities))]
    else:
        raise FlashitError("speed needs --curve (the JSON `curve` wrote) or --sparsities")
    if args.smoke:
        model, base = _smoke_model()
        impl, new_tokens = "auto", 8  # prefill rows exceed the kernels: XLA on CPU (bench --smoke runs them)
    else:
        from flashit_jax.loading import load_model

        loaded = load_model(args.model, "bf16")
        model, base = loaded.model, loaded.params
        impl, new_tokens = "auto", args.new_tokens
    cfg = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
    calib = rng.integers(0, cfg.vocab_size, (args.calib_seqs, args.calib_len)).astype(np.int32)
    stats = online.activation_stats(model, base, calib)

    def decode(name, params, extra=None):
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            log(f"decode {name}: skipped (time budget {args.budget_s:.0f} s spent)")
            return None
        runs = []
        try:
            with sparse_impl(impl):
                for _ in range(2):  # the first run of an executable pays one-time costs (allocation, autotuning)
                    runs.append(generate(model, params, [prompt], max_new_tokens=new_tokens,
                                         cache_dtype="bfloat16", steps_per_call=args.steps_per_call))
        except Exception as e:  # one variant failing (a kernel that does not lower) must not lose the others
            log(f"decode {name}: FAILED {type(e).__name__}: {str(e)[:400]}")
            report.setdefault("errors", []).append({"variant": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            return None
        res = max(runs[1:], key=lambda r: r.tokens_per_s)
        res.compile_s = runs[0].compile_s
        row = {"variant": name, "tokens_per_s": res.tokens_per_s, "ms_per_token": 1e3 / res.tokens_per_s,
               "compile_s": res.compile_s, **(extra or {})}
        report["decode"].append(row)
        write_json(args.json, {**report, "log": lines})  # a run killed by its time limit keeps what it measured
        log(f"decode {name}: {row['tokens_per_s']:.1f} tokens/s ({row['ms_per_token']:.3f} ms/token), compile "
            f"{row['compile_s']:.1f} s")
        return row

    decode("dense", base)
    for pt in pts:
        fr = online.uniform_fractions(stats, pt["target"]) if pt["fractions"] is None else \
            online.map_fractions(pt["fractions"], cfg.n_layers)
        sp = online.online_prune(base, online.thresholds(stats, fr))
        # thresholds are quantiles of this model's own activations: each linear drops its fraction of
        # the calibration inputs by construction (the mean is what the row reports)
        decode(f"online-{int(round(100 * pt['target']))}", sp,
               {"target": pt["target"], "delta_ppl_pct": pt.get("delta_pct"),
                "dropped_fraction": float(np.mean(list(fr.values())))})
        del sp
    nm = jax.block_until_ready(prune(base, "magnitude-2:4"))
    decode("2:4", nm)
    del nm
    decode("dense (again)", base)
    dense = [r["tokens_per_s"] for r in report["decode"] if r["variant"].startswith("dense")]
    ref = float(np.mean(dense)) if dense else float("nan")
    for r in report["decode"]:
        r["speedup"] = r["tokens_per_s"] / ref
    report["dense_tokens_per_s"] = ref
    if args.kernels:  # after the decode rows: those are the figures the time budget must not cut
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            log(f"kernel bench: skipped (time budget {args.budget_s:.0f} s spent)")
        else:
            from kernels.sparse_matmul import bench

            try:
                ok, rows = bench.main(["--smoke"] if args.smoke else [], log=log)
                report["kernel_check_ok"], report["kernel_bench"] = ok, rows
            except Exception as e:
                log(f"kernel bench: FAILED {type(e).__name__}: {str(e)[:400]}")
                report.setdefault("errors", []).append({"variant": "kernel bench", "error": f"{type(e).__name__}: {e}"[:2000]})
    log("")
    for line in speed_table(report):
        log(line)
    write_json(args.json, {**report, "log": lines})
    return report


def speed_table(report) -> list[str]:
    out = [f"{report['model']} batch-1 decode, {report['device']['device']}, jax {report['device']['jax_version']}, "
           f"{report['device']['date']}", "",
           "| variant | inputs dropped | Δppl SmolLM2 | tokens/s | ms/token | vs dense |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["decode"]:
        drop = f"{100 * r['dropped_fraction']:.1f}%" if "dropped_fraction" in r else ""
        d = r.get("delta_ppl_pct")
        dppl = "" if d is None or d != d else f"{d:+.2f}%"  # d != d: NaN (the smoke run has no quality point)
        out.append(f"| {r['variant']} | {drop} | {dppl} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.3f} | "
                   f"{r.get('speedup', float('nan')):.2f}x |")
    return out


def report(args) -> str:
    c = json.loads(Path(args.curve).read_text())
    s = json.loads(Path(args.speed).read_text()) if args.speed else None
    if s and "dense_tokens_per_s" not in s:  # a run cut short by its time limit: ratios from what it measured
        dense = [r["tokens_per_s"] for r in s["decode"] if r["variant"].startswith("dense")]
        s["dense_tokens_per_s"] = float(np.mean(dense)) if dense else float("nan")
        for r in s["decode"]:
            r["speedup"] = r["tokens_per_s"] / s["dense_tokens_per_s"]
    speed_by = {r.get("target"): r for r in (s or {}).get("decode", []) if "target" in r}
    lines = [f"Quality: `{c['model']}` on `{c['data']}`, ctx {c['ctx']}, {c['n_chunks']} chunks, fp32, {c['device']}, "
             f"jax {c['jax_version']}, {c['date']}; thresholds from {c['calibration']['sequences']} x "
             f"{c['calibration']['seq_len']} tokens of `{c['calibration']['data']}` ({c['allocation']}).", ""]
    if s:
        lines += [f"Speed: `{s['model']}` batch-1 decode (bf16), {s['device']['device']}, jax "
                  f"{s['device']['jax_version']}, {s['device']['date']}; dense {s['dense_tokens_per_s']:.1f} tokens/s.", ""]
    lines += ["| target sparsity | dropped (held-out) | ppl | Δppl | decode tokens/s | speedup vs dense |",
              "|---:|---:|---:|---:|---:|---:|", f"| 0 (dense) | 0 | {c['baseline_ppl']:.3f} | 0 | "
              f"{s['dense_tokens_per_s']:.1f} | 1.00x |" if s else f"| 0 (dense) | 0 | {c['baseline_ppl']:.3f} | 0 | | |"]
    for p in c["points"]:
        r = speed_by.get(p["target"])
        sp = f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x" if r else " | "
        lines.append(f"| {p['target']:.2f} | {100 * p['held_out_fraction']:.1f}% | {p['ppl']:.3f} | "
                     f"{p['delta_pct']:+.2f}% | {sp} |")
    nm = next((r for r in (s or {}).get("decode", []) if r["variant"] == "2:4"), None)
    if nm:
        lines += ["", f"2:4 (magnitude) decode: {nm['tokens_per_s']:.1f} tokens/s, {nm['speedup']:.2f}x vs dense."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [0.0] + [p["target"] for p in c["points"]]
        ax.plot(xs, [0.0] + [p["delta_pct"] for p in c["points"]], "o-", color="C0")
        ax.set_xlabel("fraction of linear inputs dropped per token")
        ax.set_ylabel(f"Δ perplexity % ({c['model']})", color="C0")
        ax.axhline(2, color="C0", ls=":", lw=1)
        if speed_by:
            ax2 = ax.twinx()
            sx = [0.0] + [t for t in xs[1:] if t in speed_by]
            ax2.plot(sx, [1.0] + [speed_by[t]["speedup"] for t in sx[1:]], "s--", color="C1")
            ax2.set_ylabel(f"decode speedup ({s['model']}, {s['device']['device']})", color="C1")
            ax2.axhline(1.5, color="C1", ls=":", lw=1)
        ax.set_title("Online (activation) pruning")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=130)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.prune_online", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curve")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--data", default="bundled")
    c.add_argument("--split", default="valid")
    c.add_argument("--ctx", type=int, default=512)
    c.add_argument("--max-chunks", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--calib", default="bundled")
    c.add_argument("--calib-seqs", type=int, default=16)
    c.add_argument("--calib-len", type=int, default=512)
    c.add_argument("--sparsities", default=DEFAULT_SPARSITIES)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="out/prune_online.json")
    s = sub.add_parser("speed")
    s.add_argument("--curve", default=None)
    s.add_argument("--sparsities", default=None, help="without --curve: uniform fractions (curve's allocation)")
    s.add_argument("--model", default="random:llama-3.2-1b")
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--new-tokens", type=int, default=256)
    s.add_argument("--steps-per-call", type=int, default=16, help="decode steps per jitted call (host overhead off)")
    s.add_argument("--calib-seqs", type=int, default=4)
    s.add_argument("--calib-len", type=int, default=128)
    s.add_argument("--kernels", action="store_true", help="then run kernels.sparse_matmul.bench (check + timings)")
    s.add_argument("--smoke", action="store_true")
    s.add_argument("--budget-s", type=float, default=None)
    s.add_argument("--json", default=None)
    r = sub.add_parser("report")
    r.add_argument("--curve", required=True)
    r.add_argument("--speed", default=None)
    r.add_argument("--markdown", default=None)
    r.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    with user_errors(f"eval.prune_online {args.cmd}"):
        return {"curve": curve, "speed": speed, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
