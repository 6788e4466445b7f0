"""Prune a model and write our model directory (then reload it and check it).

    python -m eval.prune --model smollm2-135m --recipe wanda-50 --out out/smollm2-wanda50
    python -m eval.prune --model smollm2-135m --recipe sparsegpt-2:4 --out out/smollm2-sparsegpt24
    python -m eval.prune --model smollm2-135m --recipe ffn-25+heads-25 --out out/smollm2-ffn25-heads25
    python -m eval.perplexity --model out/smollm2-wanda50          # any tool loads it back
    python -m train.finetune --model out/smollm2-wanda50 --out out/ft  # re-fine-tune, pruned weights stay 0

Unstructured recipes store MaskedArray (dense values + 1-bit mask) or NMArray (N:M packed)
leaves, with their static fields in sparsity.json; structured recipes store a smaller model
(per-layer head counts and FFN widths in config.json). The recipe, its calibration and the
resulting sparsity / shapes are appended to transforms.json. Recipes: see
`flashit_jax.prune.recipes` (magnitude-50, global-magnitude-50, wanda-50, sparsegpt-50, *-2:4,
*-4:8, ffn-25, heads-25, kv-25, depth-4, joined with '+').
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import time

from flashit_jax.errors import FlashitError, user_errors


def calibration_tokens_for(tokenizer, data: str, split: str, seqs: int, seq_len: int, seed: int = 0):
    from flashit_jax.data import load_documents
    from flashit_jax.quant import calibration_tokens

    if tokenizer is None:
        raise FlashitError("calibration needs a tokenizer; pass --tokenizer")
    return calibration_tokens(tokenizer, load_documents(data, split), n_seqs=seqs, seq_len=seq_len, seed=seed)


def needs_calibration(recipe: str) -> bool:
    from flashit_jax.prune import is_structured, resolve

    if is_structured(recipe):
        return True
    _, rules = resolve(recipe)
    return any(m is not None and m.needs_calibration for _, m in rules)


def with_output(recipe, output: str):
    """The recipe's rules with every method's `output` set (auto | masked | dense)."""
    from flashit_jax.prune import resolve

    _, rules = resolve(recipe)
    return [(p, None if m is None else dataclasses.replace(m, output=output)) for p, m in rules]


def transform_record(recipe: str, info: dict, calib_source: dict | None, params, output: str) -> dict:
    from flashit_jax.prune import is_structured, resolve, rules_to_json, sparsity

    rec = {"transform": "prune", "recipe": recipe, "calibration": calib_source,
           "date": datetime.date.today().isoformat()}
    if is_structured(recipe):
        rec["structure"] = {k: info[k] for k in ("before", "after")}
        rec["parts"] = info["parts"]
    else:
        _, rules = resolve(recipe)
        rec["rules"] = rules_to_json([(p, None if m is None else dataclasses.replace(m, output=output)) for p, m in rules])
        s = sparsity(params)
        rec["sparsity"] = {"matrices": s["n_matrices"], "weights": s["n_weights"], "sparsity": s["sparsity"]}
    return rec


def check_reload(out, model, params) -> None:
    """The saved directory gives back the same function (logits on a few tokens, bit for bit)."""
    import jax.numpy as jnp
    import numpy as np

    from flashit_jax.loading import load_model

    loaded = load_model(str(out), "fp32")
    toks = jnp.asarray(np.arange(16, dtype=np.int32)[None] % model.config.vocab_size)
    a = np.asarray(model.forward(params, toks)[0])
    b = np.asarray(loaded.model.forward(loaded.params, toks)[0])
    if loaded.config != model.config or not np.array_equal(a, b):
        raise FlashitError(f"{out}: the reloaded model differs from the pruned one (max |Δlogit| "
                           f"{float(np.max(np.abs(a - b))):.3g})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.prune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="known name, random:SHAPE, .gguf, HF or our directory")
    ap.add_argument("--recipe", required=True, help="e.g. wanda-50, sparsegpt-2:4, ffn-25+heads-25")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--calib", default="bundled", help="calibration data (Wanda, SparseGPT, structured)")
    ap.add_argument("--calib-split", default="train")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--output", default="auto", choices=["auto", "masked", "dense"],
                    help="unstructured leaves: auto (N:M packed, else masked), masked, dense (zeros in plain arrays)")
    ap.add_argument("--normalize", default="layer", choices=["none", "layer"],
                    help="structured: rank units model-wide by their output error relative to their layer's "
                         "mean (layer) or by the raw output error (none)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source when the model has none")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the saved weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip reloading the written directory")
    args = ap.parse_args(argv)
    with user_errors("eval.prune"):
        from eval.common import setup_jax
        from flashit_jax.loading import load_model, load_tokenizer, save_model
        from flashit_jax.prune import is_structured, prune_model, sparsity

        setup_jax()
        recipe = args.recipe
        rules = recipe if is_structured(recipe) else with_output(recipe, args.output)  # fails early on a bad name
        loaded = load_model(args.model, args.dtype)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else loaded.tokenizer
        t0 = time.perf_counter()
        tokens, source = None, None
        if needs_calibration(recipe):
            tokens = calibration_tokens_for(tok, args.calib, args.calib_split, args.calib_seqs, args.calib_len,
                                            args.seed)
            source = {"data": args.calib, "split": args.calib_split, "sequences": args.calib_seqs,
                      "seq_len": args.calib_len, "seed": args.seed}
        model, params, info = prune_model(loaded.model, loaded.params, rules, tokens, normalize=args.normalize,
                                          progress=True)
        elapsed = time.perf_counter() - t0
        record = transform_record(recipe, info, source, params, args.output)
        out = save_model(args.out, model.config, params, tokenizer=tok, transforms=list(loaded.transforms) + [record])
        if not args.no_check:
            check_reload(out, model, params)
        if is_structured(recipe):
            b, a = info["before"], info["after"]
            print(f"{args.model} -> {out} ({recipe}, {elapsed:.1f} s): layers {b['n_layers']} -> {a['n_layers']}, "
                  f"query heads {b['query_heads']} -> {a['query_heads']}, KV heads {b['kv_heads']} -> {a['kv_heads']}, "
                  f"FFN channels {b['ffn_channels']} -> {a['ffn_channels']}, parameters {b['n_params'] / 1e6:.2f}M -> "
                  f"{a['n_params'] / 1e6:.2f}M")
        else:
            s = sparsity(params)
            print(f"{args.model} -> {out} ({recipe}, {elapsed:.1f} s): {s['n_matrices']} matrices, sparsity "
                  f"{100 * s['sparsity']:.2f}% of {s['n_weights'] / 1e6:.1f}M weights")
        return out


if __name__ == "__main__":
    main()
