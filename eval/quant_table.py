"""The quantization table: perplexity, delta vs the baseline and size, for every recipe, one command.

    python -m eval.quant_table --model smollm2-135m --data bundled --calib bundled \\
        --json out/quant_table.json --markdown out/quant_table.md --plot out/quant_table.png

The baseline is the model as loaded (for smollm2-135m: its GGUF dequantized to fp32, i.e.
Q4_1 matrices, Q8_0 embedding, F32 norms). Every row is evaluated in fp32 on the same chunks
(llama.cpp protocol by default). Size = bytes of every stored leaf: QArray codes, scales and
zeros as stored, float leaves (norms, unquantized embedding) counted as bf16. `kv-int8` is the
baseline's weights with an int8 KV cache. Trained rows (BitNet QAT, QLoRA; docs/quantization.md):
`bitnet=model:out/bitnet/model`, `qlora=qlora:out/qlora`, `qlora-merged-w4=model:out/qlora/model@w4g64`.
`RECIPE:seq` calibrates layer by layer from the partly quantized model (GPTQ's order,
flashit_jax.quant.sequential; one calibration pass per layer) instead of once from the float model.
Finished rows are kept in --json and skipped when
the command is run again with the same settings (--fresh recomputes).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from flashit_jax.errors import FlashitError, user_errors

DEFAULT_ROWS = ["baseline", "w8", "w4g32-asym", "w4g32-asym+emb8", "w4g64", "w4g64-gptq", "w4g64-awq", "w3g64",
                "w3g64-gptq", "w3g64-awq", "w3g64-hadamard", "w3g64-hadamard-gptq", "w2g64", "w2g64-gptq",
                "w2g64-hadamard", "w2g64-hadamard-gptq", "aqlm-2x8", "w8a8", "w8a8-smoothquant", "llm-int8", "fp8", "kv-int8"]
GOALS = [  # (description, rows, test on {row: delta%})
    ("W8 delta <= 0.5%", ["w8"], lambda d: d["w8"] <= 0.5),
    ("W4 GPTQ g64 delta <= 3%", ["w4g64-gptq"], lambda d: d["w4g64-gptq"] <= 3.0),
    ("w4g32-asym delta == 0 (reproduces the Q4_1 weights)", ["w4g32-asym"], lambda d: d["w4g32-asym"] == 0.0),
    ("SmoothQuant W8A8 delta <= 1.5%", ["w8a8-smoothquant"], lambda d: d["w8a8-smoothquant"] <= 1.5),
    ("SmoothQuant better than naive W8A8", ["w8a8-smoothquant", "w8a8"],
     lambda d: d["w8a8-smoothquant"] < d["w8a8"]),
    ("GPTQ better than RTN at 4 bits", ["w4g64-gptq", "w4g64"], lambda d: d["w4g64-gptq"] < d["w4g64"]),
    ("GPTQ better than RTN at 3 bits", ["w3g64-gptq", "w3g64"], lambda d: d["w3g64-gptq"] < d["w3g64"]),
    ("AWQ better than RTN at 4 bits", ["w4g64-awq", "w4g64"], lambda d: d["w4g64-awq"] < d["w4g64"]),
    ("AWQ better than RTN at 3 bits", ["w3g64-awq", "w3g64"], lambda d: d["w3g64-awq"] < d["w3g64"]),
    ("Hadamard rotation helps GPTQ at 3 bits", ["w3g64-hadamard-gptq", "w3g64-gptq"],
     lambda d: d["w3g64-hadamard-gptq"] < d["w3g64-gptq"]),
    ("Hadamard rotation helps GPTQ at 2 bits", ["w2g64-hadamard-gptq", "w2g64-gptq"],
     lambda d: d["w2g64-hadamard-gptq"] < d["w2g64-gptq"]),
    ("Hadamard rotation helps RTN at 3 bits", ["w3g64-hadamard", "w3g64"], lambda d: d["w3g64-hadamard"] < d["w3g64"]),
    ("Hadamard rotation helps RTN at 2 bits", ["w2g64-hadamard", "w2g64"], lambda d: d["w2g64-hadamard"] < d["w2g64"]),
    ("AQLM 2x8 better than 2-bit GPTQ g64 (with or without Hadamard)", ["aqlm-2x8", "w2g64-gptq", "w2g64-hadamard-gptq"],
     lambda d: d["aqlm-2x8"] < min(d["w2g64-gptq"], d["w2g64-hadamard-gptq"])),
]


def _trained_record(path: str) -> dict:
    import json as _json

    tf = Path(path) / "transforms.json"
    recs = _json.loads(tf.read_text()) if tf.exists() else []
    return recs[-1] if recs else {}


def _budget(r: dict) -> str:
    if "steps" not in r:
        return ""
    return (f"{r['steps']} steps x {r['batch_size']} x {r['seq_len']} tokens of {r['data']}:{r['split']}"
            f" ({r['steps'] * r['batch_size'] * r['seq_len']} tokens)")


def _spec(row: str) -> str:
    """A row is RECIPE, `model:DIR[@RECIPE]`, `qlora:RUN`, or LABEL=one of those (LABEL is shown)."""
    return row.split("=", 1)[1] if "=" in row and row.split("=", 1)[1].startswith(("model:", "qlora:")) else row


def _label(row: str) -> str:
    return row.split("=", 1)[0] if _spec(row) != row else row


def _recipe(row: str) -> str:
    """'w4g64-gptq:seq' -> 'w4g64-gptq': the recipe of a row calibrated sequentially (or the row itself)."""
    return row.removesuffix(":seq")


def describe_row(row: str) -> str:
    row = _spec(row)
    if row.endswith(":seq"):
        return describe_row(_recipe(row)) + "; calibrated layer by layer from the partly quantized model"
    if row == "baseline":
        return "as loaded"
    if row.startswith(("model:", "qlora:")):
        kind, rest = row.split(":", 1)
        path, _, recipe = rest.partition("@")
        if kind == "qlora":
            r = _trained_record(str(Path(path) / "model"))
            kind = "LoRA" if r.get("base", "float") == "float" else "QLoRA"
            return (f"{kind}: {r.get('base')} base (frozen) + rank-{r.get('rank')} adapters in bf16, unmerged; "
                    f"trained {_budget(r)}")
        r = _trained_record(path)
        what = {"lora": lambda: f"LoRA rank {r.get('rank')} on a {r.get('base')} base, merged to bf16",
                "finetune": lambda: ("BitNet b1.58 QAT: ternary W (absmean per tensor) x int8 X per token"
                                     if r.get("qat", {}).get("method") == "bitnet-b1.58" else "fine-tuned")}
        text = what.get(r.get("transform"), lambda: f"model {path}")()
        text += f"; trained {_budget(r)}" if _budget(r) else ""
        return text + (f"; then re-quantized {recipe}" if recipe else "")
    if row == "kv-int8":
        return "baseline weights, int8 KV cache (scale per token and head)"
    from flashit_jax.quant import named_recipe

    parts = []
    for pattern, m in named_recipe(row):
        if "embed" in pattern:
            parts.append("tied embedding/lm_head: int8, one scale per vocab row")
        elif "lm_head" not in pattern:
            parts.insert(0, m.short())
    return "; ".join(parts)


def file_size(spec: str) -> int | None:
    from flashit_jax.loading.resolver import KNOWN, cache_dir

    if spec in KNOWN:
        p = cache_dir() / "models" / Path(KNOWN[spec].member).name
        return p.stat().st_size if p.exists() else None
    p = Path(spec)
    return p.stat().st_size if p.is_file() else None


def markdown(results: dict, rows: list[str], settings: dict, baseline_note: str) -> str:
    base = results["baseline"]["ppl"]
    lines = ["| recipe | ppl | Δ% vs baseline | size (MB) | what |", "|---|---:|---:|---:|---|"]
    for row in rows:
        r = results.get(row)
        if r is None:
            continue
        delta = 100.0 * (r["ppl"] / base - 1.0)
        size = f"{r['size_bytes'] / 1e6:.1f}"
        if row == "baseline" and r.get("file_bytes"):
            size += f" (GGUF file {r['file_bytes'] / 1e6:.1f})"
        lines.append(f"| `{_label(row)}` | {r['ppl']:.4f} | {delta:+.2f} | {size} | {describe_row(row)} |")
    head = (f"model `{settings['model']}` ({baseline_note}); data `{settings['data']}:{settings['split']}`, "
            f"protocol {settings['protocol']}, ctx {settings['ctx']}, {results['baseline']['n_chunks']} chunks; "
            f"calibration {settings['calib_seqs']} x {settings['calib_len']} tokens of `{settings['calib']}:"
            f"{settings['calib_split']}`; device {results['baseline']['device']}, {results['baseline']['date']}")
    return head + "\n\n" + "\n".join(lines) + "\n"


def goal_lines(results: dict) -> list[str]:
    base = results["baseline"]["ppl"]
    d = {k: 100.0 * (v["ppl"] / base - 1.0) for k, v in results.items()}
    out = []
    for text, need, test in GOALS:
        if all(r in d for r in need):
            out.append(f"- [{'x' if test(d) else ' '}] {text}")
    return out


def plot(results: dict, rows: list[str], path: str, title: str = "") -> None:
    """Horizontal bars: perplexity delta per recipe (symlog axis), size in MB written beside each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baseline"]["ppl"]
    shown = [r for r in rows if r in results]
    deltas = [100 * (results[r]["ppl"] / base - 1) for r in shown]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 1.2))
    y = range(len(shown))[::-1]
    ax.barh(list(y), deltas, color=["#4c72b0" if d <= 3 else "#dd8452" for d in deltas])
    ax.set_yticks(list(y), [_label(r) for r in shown], fontsize=8)
    ax.set_xscale("symlog", linthresh=1.0)
    for yi, r, d in zip(y, shown, deltas):
        ax.annotate(f"{d:+.2f}%  {results[r]['size_bytes'] / 1e6:.0f} MB", (max(d, 0), yi), fontsize=7,
                    xytext=(4, -3), textcoords="offset points")
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("perplexity delta vs baseline, % (symlog)")
    ax.set_title(title or "Quantization: quality and size", fontsize=9)
    ax.set_xlim(right=max(deltas) * 8 if max(deltas) > 0 else 1)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def trained_row_params(row: str, loaded):
    """Parameters of a trained row: `model:DIR[@RECIPE]` a saved model (re-quantized by RECIPE if
    given), `qlora:RUN` the base model quantized as recorded in RUN/model plus RUN/adapters.safetensors,
    unmerged (the QLoRA model as trained)."""
    from flashit_jax import lora
    from flashit_jax.loading import load_model
    from flashit_jax.quant import quantize

    kind, rest = row.split(":", 1)
    path, _, recipe = rest.partition("@")
    if kind == "qlora":
        r = _trained_record(str(Path(path) / "model"))
        base = loaded.params if r.get("base", "float") == "float" else quantize(loaded.params, r["base"])
        adapters, _ = lora.load_adapters(Path(path) / "adapters.safetensors")
        rules = lora.parse_rules(r["rules"], int(r["rank"]), float(r["alpha"]))
        return lora.attach(base, adapters, lora.scale_of(rules, adapters))
    m = load_model(path, "fp32")
    if m.model.config != loaded.model.config:
        raise FlashitError(f"row {row}: {path} is not a {loaded.model.config} model")
    return quantize(m.params, recipe) if recipe else m.params


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.quant_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="bundled")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--protocol", default="llamacpp", choices=["llamacpp", "all"])
    ap.add_argument("--max-chunks", type=int, default=None, help="at most this many chunks per document")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib", default="bundled")
    ap.add_argument("--calib-split", default="train")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help="comma-separated recipes (+ baseline, kv-int8); trained models: [LABEL=]model:DIR[@RECIPE] "
                         "(a saved model, re-quantized by RECIPE if given), [LABEL=]qlora:RUN (train.finetune "
                         "--lora-base run: quantized base + adapters, unmerged)")
    ap.add_argument("--json", default="out/quant_table.json", help="results (also the resume state)")
    ap.add_argument("--markdown", default=None, help="write the table here too")
    ap.add_argument("--plot", default=None, help="size vs perplexity plot (png)")
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in --json")
    args = ap.parse_args(argv)
    with user_errors("eval.quant_table"):
        import jax

        from eval.common import device_info, setup_jax
        from eval.perplexity import evaluate
        from eval.quantize import calibration_for, quantize_for
        from flashit_jax.data import load_documents
        from flashit_jax.loading import load_model
        from flashit_jax.quant import quantize, resolve, size_bytes

        setup_jax()
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        if "baseline" not in rows:
            rows.insert(0, "baseline")
        for r in rows:
            if _spec(r).startswith(("model:", "qlora:")):
                path, _, recipe = _spec(r).split(":", 1)[1].partition("@")
                if not Path(path).exists():
                    raise FlashitError(f"row {r}: no model directory {path}")
                if recipe:
                    resolve(recipe)
            elif r not in ("baseline", "kv-int8"):
                resolve(_recipe(r))
        settings = {k: getattr(args, k) for k in ("model", "data", "split", "ctx", "protocol", "max_chunks", "calib",
                                                  "calib_split", "calib_seqs", "calib_len")}
        state_path = Path(args.json)
        state = json.loads(state_path.read_text()) if state_path.exists() and not args.fresh else {}
        if state.get("settings") != settings:
            state = {"settings": settings, "results": {}}
        results = state["results"]
        loaded = load_model(args.model, "fp32")
        docs = load_documents(args.data, args.split)
        calib = None
        for row in rows:
            if row in results:
                print(f"{row}: done before (ppl {results[row]['ppl']:.4f}); --fresh recomputes")
                continue
            t0 = time.perf_counter()
            params, cache_dtype = loaded.params, None
            if row == "kv-int8":
                cache_dtype = "int8"
            elif _spec(row).startswith(("model:", "qlora:")):
                params = trained_row_params(_spec(row), loaded)
            elif row.endswith(":seq"):
                params, _ = quantize_for(loaded, loaded.tokenizer, _recipe(row), args.calib, args.calib_split,
                                         args.calib_seqs, args.calib_len, sequential=True)
                jax.block_until_ready(params)
            elif row != "baseline":
                _, rules = resolve(row)
                if calib is None and any(m is not None and m.needs_calibration for _, m in rules):
                    calib = calibration_for(loaded, loaded.tokenizer, row, args.calib, args.calib_split,
                                            args.calib_seqs, args.calib_len)
                params = quantize(loaded.params, row, calib, progress=True)
                jax.block_until_ready(params)
            quant_s = time.perf_counter() - t0
            rep = evaluate(loaded.model, params, loaded.tokenizer, docs, ctx=args.ctx, protocol=args.protocol,
                           max_chunks=args.max_chunks, batch_size=args.batch_size, cache_dtype=cache_dtype)
            results[row] = {"ppl": rep["ppl"], "mean_nll": rep["mean_nll"], "n_chunks": rep["n_chunks"],
                            "size_bytes": size_bytes(params), "quantize_s": quant_s, "what": describe_row(row),
                            "eval_tokens_per_s": rep["tokens_per_s"], **device_info()}
            if row == "baseline":
                results[row]["file_bytes"] = file_size(args.model)
            base = results.get("baseline", {}).get("ppl")
            delta = "" if base is None else f"  Δ {100 * (rep['ppl'] / base - 1):+.2f}%"
            print(f"{row}: ppl {rep['ppl']:.4f}{delta}  size {results[row]['size_bytes'] / 1e6:.1f} MB  "
                  f"(quantize {quant_s:.0f} s)")
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(state, indent=1))
            del params
        if not math.isfinite(results["baseline"]["ppl"]):
            raise FlashitError("baseline perplexity is not finite")
        table = markdown(results, rows, settings, loaded.note or loaded.source)
        goals = goal_lines(results)
        text = table + ("\nGoals:\n" + "\n".join(goals) + "\n" if goals else "")
        print()
        print(text)
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(text)
        if args.plot:
            plot(results, rows, args.plot, f"{args.model}, {args.data}:{args.split}, ctx {args.ctx} "
                 f"({results['baseline']['device']}, {results['baseline']['date']})")
        return results


if __name__ == "__main__":
    main()
