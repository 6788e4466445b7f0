"""Perplexity, by llama.cpp's protocol by default.

    python -m eval.perplexity --model smollm2-135m --data bundled --split valid --ctx 512

`llamacpp`: each document is cut into non-overlapping ctx-token chunks (the short tail is
dropped; no chunk crosses a document); position 0 of each chunk becomes BOS only if the
tokenizer adds BOS; the predictions of tokens first+1 .. ctx-1 are scored, first = ctx // 2.
`all`: every prediction after the first token of each chunk is scored.
ppl = exp(mean NLL over all scored tokens).
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import device_info, setup_jax, write_json
from flashit_jax.data import eval_chunks, load_documents
from flashit_jax.errors import FlashitError, user_errors

PROTOCOLS = ("llamacpp", "all")


def token_nll_fn(model, attn_impl: str = "auto", cache_dtype=None):
    """jit: (params, chunks [B, T]) -> NLL fp32 [B, T-1] of predicting token t+1 from t.

    cache_dtype: run the chunk through a KV cache of this dtype (e.g. "int8"), so that
    attention reads keys/values as stored there."""

    @jax.jit
    def nll(params, chunks):
        cache = None
        if cache_dtype is not None:
            cache = model.init_cache(chunks.shape[0], chunks.shape[1], cache_dtype, params=params)
        logits, _, _ = model.forward(params, chunks, cache=cache, attn_impl=attn_impl)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, chunks[:, 1:, None], axis=-1)[..., 0]

    return nll


def evaluate(model, params, tokenizer, docs, *, ctx: int = 512, protocol: str = "llamacpp",
             max_chunks: int | None = None, batch_size: int = 8, progress: bool = True,
             attn_impl: str = "auto", cache_dtype=None) -> dict:
    """Perplexity of `params` on `docs`; returns the report fields (without model/data names)."""
    from tqdm.auto import tqdm

    if protocol not in PROTOCOLS:
        raise FlashitError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    if ctx < 4:
        raise FlashitError(f"--ctx must be at least 4, got {ctx}")
    if tokenizer is None:
        raise FlashitError("this model has no tokenizer (random weights?); pass --tokenizer")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    per_doc = [eval_chunks(tokenizer.encode(d.text), ctx, bos, max_chunks) for d in docs]
    titles = [d.title for d, c in zip(docs, per_doc) for _ in range(len(c))]
    chunks = np.concatenate(per_doc) if per_doc else np.zeros((0, ctx), np.int32)
    if len(chunks) == 0:
        raise FlashitError(f"no document is at least {ctx} tokens long: nothing to score (lower --ctx?)")
    first = ctx // 2 if protocol == "llamacpp" else 0
    nll_fn = token_nll_fn(model, attn_impl, cache_dtype)
    bs = min(batch_size, len(chunks))
    n_pad = (-len(chunks)) % bs
    padded = np.concatenate([chunks, np.zeros((n_pad, ctx), np.int32)])
    compiled = nll_fn.lower(params, jnp.asarray(padded[:bs])).compile()
    chunk_nll, sums = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(padded), bs), desc="perplexity", unit="batch", disable=not progress):
        nll = np.asarray(compiled(params, jnp.asarray(padded[i: i + bs])), np.float64)[:, first:]
        for row in nll[: max(0, min(bs, len(chunks) - i))]:
            chunk_nll.append(float(row.mean()))
            sums.append(float(row.sum()))
    elapsed = time.perf_counter() - t0
    n_scored = (ctx - 1 - first) * len(chunks)
    mean_nll = sum(sums) / n_scored
    return {"ctx": ctx, "protocol": protocol, "n_chunks": len(chunks), "n_scored": n_scored,
            "mean_nll": mean_nll, "ppl": math.exp(mean_nll), "chunk_nll": chunk_nll, "chunk_titles": titles,
            "tokens_per_s": len(chunks) * ctx / elapsed, **device_info()}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="known name, random:SHAPE, .gguf, HF or our directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source when the model has none")
    ap.add_argument("--data", default="bundled")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--protocol", default="llamacpp", choices=PROTOCOLS)
    ap.add_argument("--max-chunks", type=int, default=None, help="at most this many chunks per document")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--attn-impl", default="auto")
    ap.add_argument("--cache-dtype", default=None, help="score through a KV cache of this dtype (e.g. int8)")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    with user_errors("eval.perplexity"):
        from flashit_jax.loading import load_model, load_tokenizer

        setup_jax()
        if args.model.startswith("random:") and not args.tokenizer:  # before building the weights
            raise FlashitError(f"{args.model} has random weights and no tokenizer; pass --tokenizer smollm2-135m")
        loaded = load_model(args.model, args.dtype)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else loaded.tokenizer
        docs = load_documents(args.data, args.split)
        rep = evaluate(loaded.model, loaded.params, tok, docs, ctx=args.ctx, protocol=args.protocol,
                       max_chunks=args.max_chunks, batch_size=args.batch_size, attn_impl=args.attn_impl,
                       cache_dtype=args.cache_dtype)
        report = {"model": args.model, "data": args.data, "split": args.split, "dtype": args.dtype,
                  "note": loaded.note, **rep}
        write_json(args.json, report)
        print(f"model {args.model} ({loaded.note or loaded.source})")
        print(f"data {args.data}:{args.split}  protocol {args.protocol}  ctx {args.ctx}  chunks {rep['n_chunks']}  "
              f"scored {rep['n_scored']}")
        print(f"mean NLL {rep['mean_nll']:.5f}  ppl {rep['ppl']:.4f}  ({rep['tokens_per_s']:.0f} tokens/s on "
              f"{rep['device']})")
        return report


if __name__ == "__main__":
    main()
