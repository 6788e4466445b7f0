"""The pruning table: perplexity and Δ% of every method, one-shot and after a short re-fine-tune,
plus lottery-ticket rounds, from one command.

    python -m eval.prune_table --model smollm2-135m --data bundled --calib bundled \\
        --out out/prune_table --markdown out/prune_table.md --plot out/prune_table.png

Per recipe row: prune (eval.prune's code path; the pruned model is written to OUT/models/ROW),
evaluate, re-fine-tune with cross-entropy for --ft-steps steps on --ft-data (train.finetune's
task: pruned weights held at 0; structured rows train their smaller model), evaluate again.
`dense+ft` is the unpruned model fine-tuned the same way: the fine-tune alone changes the
perplexity on this data, so compare the "after" column against it. Lottery-ticket rows
(train.imp): R rounds of global magnitude pruning at --lt-rate per round, each re-trained
--lt-steps - --lt-rewind steps, once rewinding to the dense run's step --lt-rewind
(lottery ticket) and once keeping the trained weights (IMP).

Every perplexity is fp32 on the same chunks (llama.cpp protocol, ctx 512 by default). Finished
rows are kept in OUT/results.json and skipped when the command runs again with the same
settings (--fresh recomputes); models and training runs resume from their directories.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from flashit_jax.errors import FlashitError, user_errors

DEFAULT_ROWS = ["magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2:4", "wanda-2:4", "sparsegpt-2:4",
                "ffn-25", "heads-25", "kv-25"]


def _ft_args(a, model_dir: Path, out: Path, steps: int) -> list[str]:
    return ["--model", str(model_dir), "--data", a.ft_data, "--seq-len", str(a.ft_seq_len), "--batch-size",
            str(a.ft_batch_size), "--steps", str(steps), "--lr", str(a.ft_lr), "--warmup-steps", str(a.ft_warmup),
            "--compute-dtype", a.ft_dtype, "--eval-every", "0", "--eval-max-chunks", "1", "--eval-ctx", "256",
            "--ckpt-every", str(max(1, steps // 2)), "--progress", "true", "--seed", str(a.seed), "--out", str(out)]


def _describe(info: dict | None, params, recipe: str) -> str:
    from flashit_jax.prune import is_structured, sparsity

    if recipe in ("baseline", "dense+ft"):
        return "dense"
    if is_structured(recipe):
        b, a = info["before"], info["after"]
        return (f"{a['query_heads']}/{b['query_heads']} heads, {a['kv_heads']}/{b['kv_heads']} KV heads, "
                f"{a['ffn_channels']}/{b['ffn_channels']} FFN channels, {a['n_params'] / 1e6:.2f}M/{b['n_params'] / 1e6:.2f}M params")
    s = sparsity(params)
    return f"{100 * s['sparsity']:.2f}% of the layer matrices"


def markdown(res: dict, settings: dict) -> str:
    base = res["baseline"]["ppl"]
    dft = res.get("dense+ft", {}).get("ppl")

    def d(p):
        return f"{100 * (p / base - 1):+.1f}"

    lines = ["| recipe | what | ppl | Δ% | ppl after re-fine-tune | Δ% vs baseline | Δ% vs dense+ft |",
             "|---|---|---:|---:|---:|---:|---:|"]
    order = [k for k in ("baseline", "dense+ft") if k in res] + [k for k in res if k not in ("baseline", "dense+ft")]
    for row in order:
        r = res[row]
        if row.startswith(("lt:", "imp:")):
            continue
        after = r.get("ppl_ft")
        a_txt = "" if after is None else f"{after:.3f}"
        a_d = "" if after is None else d(after)
        a_ft = "" if after is None or dft is None else f"{100 * (after / dft - 1):+.1f}"
        lines.append(f"| `{row}` | {r['what']} | {r['ppl']:.3f} | {d(r['ppl'])} | {a_txt} | {a_d} | {a_ft} |")
    lt = [(k, v) for k, v in res.items() if k.startswith(("lt:", "imp:"))]
    if lt:
        lines += ["", "| lottery ticket / IMP | round | sparsity | ppl | Δ% vs baseline | Δ% vs dense+ft |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k, v in lt:
            how = f"rewind to step {settings['lt_rewind']}" if k.startswith("lt:") else "no rewind (IMP)"
            vs_ft = "" if dft is None else f"{100 * (v['ppl'] / dft - 1):+.1f}"
            lines.append(f"| {how} | {v['round']} | {100 * v['sparsity']:.1f}% | {v['ppl']:.3f} | {d(v['ppl'])} | {vs_ft} |")
    b = res["baseline"]
    head = (f"model `{settings['model']}`, data `{settings['data']}:{settings['split']}`, ctx {settings['ctx']}, "
            f"{b['n_chunks']} chunks (llama.cpp protocol), fp32; calibration {settings['calib_seqs']} x "
            f"{settings['calib_len']} tokens of `{settings['calib']}:train`; re-fine-tune: {settings['ft_steps']} steps x "
            f"{settings['ft_batch_size']} x {settings['ft_seq_len']} tokens of `{settings['ft_data']}:train`, AdamW lr "
            f"{settings['ft_lr']}; device {b['device']}, {b['date']}")
    return head + "\n\n" + "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = res["baseline"]["ppl"]
    rows = [k for k in res if not k.startswith(("lt:", "imp:")) and k not in ("baseline", "dense+ft")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * (res[r]["ppl"] / base - 1) for r in rows], 0.4, label="one-shot")
    ax.bar([x + 0.2 for x in xs], [100 * ((res[r].get("ppl_ft") or float("nan")) / base - 1) for r in rows], 0.4,
           label="after re-fine-tune")
    if "dense+ft" in res:
        ax.axhline(100 * (res["dense+ft"]["ppl"] / base - 1), color="C2", lw=1, ls="--", label="dense, same fine-tune")
    ax.set_xticks(list(xs), rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("perplexity Δ% vs baseline")
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend()
    ax.set_title("Pruning SmolLM2-135M: one-shot vs re-fine-tuned")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.prune_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="bundled")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib", default="bundled")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--ft-steps", type=int, default=16, help="re-fine-tune steps per row (0: none)")
    ap.add_argument("--ft-data", default="bundled")
    ap.add_argument("--ft-batch-size", type=int, default=4)
    ap.add_argument("--ft-seq-len", type=int, default=256)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--ft-warmup", type=int, default=2)
    ap.add_argument("--ft-dtype", default="fp32", help="training compute dtype (fp32 is faster than bf16 on CPU)")
    ap.add_argument("--lt-rounds", type=int, default=3, help="lottery-ticket rounds (0: none)")
    ap.add_argument("--lt-rate", type=float, default=0.2)
    ap.add_argument("--lt-steps", type=int, default=12)
    ap.add_argument("--lt-rewind", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/prune_table", help="models, runs and results.json (the resume state)")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)
    with user_errors("eval.prune_table"):
        from eval.common import device_info, setup_jax
        from eval.perplexity import evaluate
        from eval.prune import calibration_tokens_for, check_reload, needs_calibration, transform_record
        from flashit_jax.data import load_documents
        from flashit_jax.loading import load_model, save_model
        from flashit_jax.prune import is_structured, prune_model, resolve
        from flashit_jax.quant import calibrate

        setup_jax()
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        for r in rows:
            if not is_structured(r):
                resolve(r)
        out = Path(args.out)
        settings = {k: getattr(args, k) for k in ("model", "data", "split", "ctx", "max_chunks", "calib", "calib_seqs",
                                                  "calib_len", "ft_steps", "ft_data", "ft_batch_size", "ft_seq_len",
                                                  "ft_lr", "ft_warmup", "ft_dtype", "lt_rounds", "lt_rate", "lt_steps",
                                                  "lt_rewind", "seed")}
        state_path = out / "results.json"
        state = json.loads(state_path.read_text()) if state_path.exists() and not args.fresh else {}
        if state.get("settings") != settings:
            state = {"settings": settings, "results": {}}
        res = state["results"]

        def save():
            out.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(state, indent=1))

        loaded = load_model(args.model, "fp32")
        tok = loaded.tokenizer
        docs = load_documents(args.data, args.split)

        def ppl(model, params):
            return evaluate(model, params, tok, docs, ctx=args.ctx, max_chunks=args.max_chunks,
                            batch_size=args.batch_size)

        def finetune(model_dir: Path, run_dir: Path) -> Path:
            from train.config import parse_args
            from train.finetune import build_task
            from train.loop import run

            cfg = parse_args(_ft_args(args, model_dir, run_dir, args.ft_steps), prog="finetune",
                             defaults={"loss": "ce", "teacher": ""})
            if not (run_dir / "summary.json").exists():
                s = run(cfg, build_task(cfg), prog=f"finetune {model_dir.name}")
                s.pop("state", None)
            return run_dir / "model"

        if "baseline" not in res:
            rep = ppl(loaded.model, loaded.params)
            res["baseline"] = {"ppl": rep["ppl"], "n_chunks": rep["n_chunks"], "what": "dense", **device_info()}
            save()
        print(f"baseline: ppl {res['baseline']['ppl']:.4f}")
        tokens, calib_cache = None, None
        # every one-shot row first, then the re-fine-tunes: a cut-short run still has the whole one-shot column
        for row in rows:
            r = res.get(row, {})
            if "ppl" in r:
                print(f"{row}: done before (ppl {r['ppl']:.4f})")
                continue
            mdir = out / "models" / row.replace(":", "_")
            t0 = time.perf_counter()
            if needs_calibration(row) and tokens is None:
                tokens = calibration_tokens_for(tok, args.calib, "train", args.calib_seqs, args.calib_len, args.seed)
            calib = None
            if needs_calibration(row) and not is_structured(row):  # one pass serves every unstructured row
                if calib_cache is None:
                    calib_cache = calibrate(loaded.model, loaded.params, tokens)
                calib = calib_cache
            model, params, info = prune_model(loaded.model, loaded.params, row,
                                              tokens if needs_calibration(row) else None, calib=calib,
                                              progress=True)
            prune_s = time.perf_counter() - t0
            src = None if not needs_calibration(row) else {"data": args.calib, "split": "train",
                                                           "sequences": args.calib_seqs, "seq_len": args.calib_len}
            save_model(mdir, model.config, params, tokenizer=tok,
                       transforms=list(loaded.transforms) + [transform_record(row, info, src, params, "auto")])
            check_reload(mdir, model, params)
            rep = ppl(model, params)
            r = {"ppl": rep["ppl"], "what": _describe(info, params, row), "prune_s": prune_s, **device_info()}
            res[row] = r
            save()
            print(f"{row}: ppl {rep['ppl']:.4f} ({r['what']}, pruned in {prune_s:.0f} s)")
            del params
        calib_cache = None
        base_dir = out / "models" / "baseline"
        if args.ft_steps and "dense+ft" not in res:
            if not (base_dir / "config.json").exists():
                save_model(base_dir, loaded.config, loaded.params, tokenizer=tok, transforms=list(loaded.transforms))
            m = load_model(str(finetune(base_dir, out / "ft" / "baseline")), "fp32")
            rep = ppl(m.model, m.params)
            res["dense+ft"] = {"ppl": rep["ppl"], "what": "dense, re-fine-tuned", "ppl_ft": None, **device_info()}
            save()
        for row in rows if args.ft_steps else []:
            r = res[row]
            if "ppl_ft" in r:
                continue
            mdir = out / "models" / row.replace(":", "_")
            m = load_model(str(finetune(mdir, out / "ft" / row.replace(":", "_"))), "fp32")
            rep = ppl(m.model, m.params)
            r["ppl_ft"] = rep["ppl"]
            save()
            print(f"{row}: after re-fine-tune ppl {rep['ppl']:.4f}")
        if args.lt_rounds:
            from train.config import parse_args
            from train.imp import run_imp

            for mode, key in (("rewind", "lt"), ("finetune", "imp")):
                if all(f"{key}:{i}" in res for i in range(1, args.lt_rounds + 1)):
                    continue
                run_dir = out / key
                if key == "imp" and (out / "lt" / "round_0" / "summary.json").exists() and not (run_dir / "round_0").exists():
                    shutil.copytree(out / "lt" / "round_0", run_dir / "round_0")  # the same dense run
                base_args = _ft_args(args, Path(args.model), run_dir, args.lt_steps)
                cfg = parse_args(base_args, prog="imp", defaults={"loss": "ce", "teacher": ""})
                rec = run_imp(cfg, rounds=args.lt_rounds, rate=args.lt_rate, rewind_step=args.lt_rewind, mode=mode)
                for rd in rec["rounds_detail"][1:]:
                    m = load_model(rd["model"], "fp32")
                    rep = ppl(m.model, m.params)
                    res[f"{key}:{rd['round']}"] = {"round": rd["round"], "sparsity": rd["sparsity"], "ppl": rep["ppl"]}
                    save()
                    print(f"{key} round {rd['round']}: sparsity {100 * rd['sparsity']:.1f}% ppl {rep['ppl']:.4f}")
        if "baseline" not in res:
            raise FlashitError("no baseline result")
        text = markdown(res, settings)
        print()
        print(text)
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(text)
        if args.plot:
            plot(res, args.plot)
        return res


if __name__ == "__main__":
    main()
