"""Quantize a model and write our model directory.

    python -m eval.quantize --model smollm2-135m --recipe w4g64-gptq --calib bundled --out out/smollm2-w4g64-gptq
    python -m eval.perplexity --model out/smollm2-w4g64-gptq

QArray leaves are stored as PATH.qvalues / PATH.scales / PATH.zeros in model.safetensors with
their static fields in quant.json; the recipe (its rules, calibration) is appended to
transforms.json. Recipes: see `flashit_jax.quant.recipes` (w8, w4g64, w4g32-asym, w4g64-gptq,
w4g64-awq, w3g64-gptq, w8a8, w8a8-smoothquant, llm-int8, fp8, ...+emb8).
"""
from __future__ import annotations

import argparse
import datetime
import time

from flashit_jax.errors import FlashitError, user_errors


def calibration_tokens_for(tokenizer, recipe, data: str | None, split: str, seqs: int, seq_len: int, seed: int = 0):
    """The calibration tokens [seqs, seq_len] a recipe needs (None if it needs none); FlashitError if it needs
    them and `data` is None."""
    from flashit_jax.data import load_documents
    from flashit_jax.quant import calibration_tokens, resolve

    name, rules = resolve(recipe)
    needy = sorted({m.name for _, m in rules if m is not None and m.needs_calibration})
    if not needy:
        return None
    if data is None:
        raise FlashitError(f"recipe {name} uses {', '.join(needy)}, which need calibration data: pass --calib "
                           "(e.g. --calib bundled, a .jsonl file or hf:NAME)")
    if tokenizer is None:
        raise FlashitError("calibration needs a tokenizer; pass --tokenizer")
    return calibration_tokens(tokenizer, load_documents(data, split), n_seqs=seqs, seq_len=seq_len, seed=seed)


def calibration_for(loaded, tokenizer, recipe, data: str | None, split: str, seqs: int, seq_len: int,
                    seed: int = 0, progress: bool = True):
    """The Calibration a recipe needs (None if it needs none); FlashitError if it needs one and `data` is None."""
    from flashit_jax.quant import calibrate

    tokens = calibration_tokens_for(tokenizer, recipe, data, split, seqs, seq_len, seed)
    if tokens is None:
        return None
    return calibrate(loaded.model, loaded.params, tokens, progress=progress,
                     source={"data": data, "split": split, "seed": seed})


def quantize_for(loaded, tokenizer, recipe, data: str | None, split: str, seqs: int, seq_len: int, seed: int = 0,
                 sequential: bool = False):
    """(quantized params, calibration record or None): one calibration pass, or with `sequential` one per layer
    from the partly quantized model (flashit_jax.quant.sequential)."""
    from flashit_jax.quant import quantize

    if not sequential:
        calib = calibration_for(loaded, tokenizer, recipe, data, split, seqs, seq_len, seed)
        return quantize(loaded.params, recipe, calib, progress=True), None if calib is None else calib.describe()
    from flashit_jax.quant.sequential import quantize_sequential

    tokens = calibration_tokens_for(tokenizer, recipe, data, split, seqs, seq_len, seed)
    if tokens is None:
        raise FlashitError(f"recipe {recipe} needs no calibration, so sequential calibration does not apply")
    params = quantize_sequential(loaded.model, loaded.params, recipe, tokens, progress=True)
    return params, {"n_tokens": int(tokens.size), "data": data, "split": split, "seed": seed, "sequences": len(tokens),
                    "seq_len": int(tokens.shape[1]), "sequential": True}


def transform_record(recipe, calib) -> dict:
    """calib: a Calibration, its describe() dict, or None."""
    from flashit_jax.quant import resolve, rules_to_json

    name, rules = resolve(recipe)
    return {"transform": "quantize", "recipe": name, "rules": rules_to_json(rules),
            "calibration": calib.describe() if hasattr(calib, "describe") else calib,
            "date": datetime.date.today().isoformat()}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="known name, random:SHAPE, .gguf, HF or our directory")
    ap.add_argument("--recipe", required=True, help="recipe name, e.g. w4g64-gptq")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--calib", default=None, help="calibration data for GPTQ/AWQ/SmoothQuant (e.g. bundled)")
    ap.add_argument("--calib-split", default="train")
    ap.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source when the model has none")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype of the saved model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sequential", action="store_true",
                    help="calibrate layer by layer from the partly quantized model (GPTQ's order; one pass per layer)")
    args = ap.parse_args(argv)
    with user_errors("eval.quantize"):
        from eval.common import setup_jax
        from flashit_jax.loading import load_model, load_tokenizer, save_model
        from flashit_jax.quant import resolve, size_bytes

        setup_jax()
        resolve(args.recipe)  # fail on a bad name before loading anything
        loaded = load_model(args.model, args.dtype)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else loaded.tokenizer
        t0 = time.perf_counter()
        qparams, calib = quantize_for(loaded, tok, args.recipe, args.calib, args.calib_split, args.calib_seqs,
                                      args.calib_len, args.seed, sequential=args.sequential)
        elapsed = time.perf_counter() - t0
        out = save_model(args.out, loaded.config, qparams, tokenizer=tok,
                         transforms=list(loaded.transforms) + [transform_record(args.recipe, calib)])
        print(f"{args.model} -> {out} ({args.recipe}, {elapsed:.1f} s): {size_bytes(loaded.params) / 1e6:.1f} MB "
              f"-> {size_bytes(qparams) / 1e6:.1f} MB (float leaves counted as bf16)")
        return out


if __name__ == "__main__":
    main()
