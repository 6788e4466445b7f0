"""Batch-1 decode speed and memory per sequence at long context: recurrent (Mamba) vs KV-cache models.

    python -m eval.decode_bench --models random:mamba-130m,random:smollm2-135m --contexts 1024,8192,32768

For each model and context c the cache is filled as if c tokens had been consumed (random
contents; the cost of a step does not depend on the values), then `steps` greedy decode steps
run through `model.forward(params, tok[:, None], cache=cache)` (jitted, cache donated) and are
timed between two device syncs. Memory per sequence is the cache one sequence holds at
context c (KV: 2 x layers x c x kv_heads x head_dim; Mamba: conv + SSM state, any c).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp

from eval.common import device_info, write_json
from flashit_jax.errors import user_errors
from flashit_jax.loading import load_model


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _step(params, cache, tok, *, model):
    logits, cache, _ = model.forward(params, tok[:, None], cache=cache)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("model", "n"), donate_argnames=("cache",))
def _steps(params, cache, tok, *, model, n: int):
    """n greedy steps in one call (lax.scan): no per-token dispatch, as a serving loop would run."""
    def body(carry, _):
        tok, cache = carry
        logits, cache, _ = model.forward(params, tok[:, None], cache=cache)
        return (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache), None

    (tok, cache), _ = jax.lax.scan(body, (tok, cache), None, length=n)
    return tok, cache


def _filled_cache(model, params, context: int, steps: int, dtype, key):
    """A batch-1 cache that has consumed `context` tokens (random contents)."""
    cache = model.init_cache(1, context + steps + 1, dtype, params=params)
    leaves, tree = jax.tree.flatten(cache)
    keys = jax.random.split(key, len(leaves))
    leaves = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
              else x for k, x in zip(keys, leaves)]
    cache = jax.tree.unflatten(tree, leaves)
    return dataclasses.replace(cache, lengths=jnp.full((1,), context, jnp.int32))


def _bytes_per_sequence(cache, context: int) -> int:
    if hasattr(cache, "nbytes_at"):  # hybrid: KV of the attention layers at `context` + the mixers' state
        return cache.nbytes_at(context)
    if hasattr(cache, "k"):  # KV cache: what `context` tokens occupy
        per_slot = sum(a[0, 0].size * a.dtype.itemsize for a in (*cache.k, *cache.v))
        return per_slot * context
    return cache.nbytes_per_sequence()


def bench(spec: str, contexts, steps: int, dtype: str, per_call: int = 1):
    """per_call > 1: the timed steps run `per_call` at a time in one jitted scan (steps rounded up to a multiple)."""
    loaded = load_model(spec, dtype)
    model, params = loaded.model, loaded.params
    cdtype = jax.tree.leaves(params["embed"])[0].dtype
    n_params = sum(x.size for x in jax.tree.leaves(params))
    if per_call < 1:
        raise ValueError(f"per_call must be >= 1, got {per_call}")
    calls = -(-steps // per_call)
    steps = calls * per_call
    if per_call == 1:
        step = functools.partial(_step, model=model)
    else:
        step = functools.partial(_steps, model=model, n=per_call)
    rows = []
    for c in contexts:
        cache = _filled_cache(model, params, c, steps + 4 * per_call, cdtype, jax.random.key(c))
        tok = jnp.zeros((1,), jnp.int32)
        t0 = time.perf_counter()
        tok, cache = step(params, cache, tok)
        jax.block_until_ready(tok)
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            tok, cache = step(params, cache, tok)
        jax.block_until_ready(tok)
        t0 = time.perf_counter()
        for _ in range(calls):
            tok, cache = step(params, cache, tok)
        jax.block_until_ready(tok)
        dt = time.perf_counter() - t0
        row = {"model": spec, "context": c, "tokens_per_s": steps / dt, "ms_per_token": 1e3 * dt / steps,
               "cache_MiB_per_seq": _bytes_per_sequence(cache, c) / 2**20, "params_M": n_params / 1e6,
               "compile_s": compile_s, "per_call": per_call}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del cache
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random:mamba-130m,random:smollm2-135m")
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--per-call", type=int, default=1,
                    help="decode steps per jitted call (a lax.scan; 1: one call per token, host dispatch included)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.per_call < 1:
        ap.error(f"--per-call must be >= 1, got {args.per_call}")
    with user_errors("decode_bench"):
        contexts = [int(c) for c in args.contexts.split(",")]
        rows = [r for spec in args.models.split(",")
                for r in bench(spec, contexts, args.steps, args.dtype, per_call=args.per_call)]
    info = device_info()
    print(f"\nbatch-1 decode, {args.dtype}, {args.per_call} step(s) per call, {info['device']}, {info['date']}, "
          f"jax {info['jax_version']}")
    print(f"{'model':<24}{'context':>9}{'tok/s':>10}{'ms/tok':>9}{'cache MiB/seq':>15}")
    for r in rows:
        print(f"{r['model']:<24}{r['context']:>9}{r['tokens_per_s']:>10.1f}{r['ms_per_token']:>9.2f}"
              f"{r['cache_MiB_per_seq']:>15.1f}")
    write_json(args.out, {**info, "dtype": args.dtype, "steps": args.steps, "per_call": args.per_call, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
