"""What a row measures: quality (perplexity) and speed (prefill, decode, TTFT, memory, MBU).

Speed protocol (every row, every device):
- prefill tokens/s: `prefill_batch` prompts of `prompt_len` tokens through one jitted forward
  that fills a KV cache and takes the logits at each prompt's last token (median of 3 calls);
- TTFT: batch 1, the first `prompt_len` tokens of a validation document, prefill + first token
  (`generate`'s own timing, compiled);
- decode tokens/s: the same prompt, `new_tokens` greedy tokens (no EOS stop), 16 decode steps
  per jitted call (or the decoding level's drafter, 8 rounds per call); best of `decode_runs`;
- peak memory: the largest XLA buffer assignment (arguments + outputs - aliased + temporaries)
  of the row's serving executables (prefill and decode), from `compiled.memory_analysis()`;
- MBU: bytes one forward pass reads (every stored leaf of the parameters once - codes, scales,
  masks as stored - plus the KV cache at the mean decode length) x forward passes per second /
  the copy bandwidth measured in the same process (XLA elementwise copy, read + write).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError


@contextlib.contextmanager
def runtime(kernels: bool):
    """XLA everywhere (kernels=False), or the Pallas kernels where the backend has them. The GEMV
    switch is read while tracing, so every jitted function of a row is traced inside this."""
    from flashit_jax.nn.qarray import matmul_impl

    old = os.environ.get("FLASHIT_JAX_GEMV")
    if not kernels:
        os.environ["FLASHIT_JAX_GEMV"] = "0"
    try:
        with matmul_impl("auto" if kernels else "xla"):
            yield "auto" if kernels else "xla"
    finally:
        if old is None:
            os.environ.pop("FLASHIT_JAX_GEMV", None)
        else:
            os.environ["FLASHIT_JAX_GEMV"] = old


def quality(built, docs, settings) -> dict:
    from eval.perplexity import evaluate

    with runtime(built.kernels) as attn:
        rep = evaluate(built.model, built.params, built.tokenizer, docs, ctx=settings["ctx"],
                       protocol=settings["protocol"], max_chunks=settings["chunks_per_doc"],
                       batch_size=settings["eval_batch"], attn_impl=attn, cache_dtype=built.cache_dtype,
                       progress=settings.get("progress", True))
    return {"ppl": rep["ppl"], "mean_nll": rep["mean_nll"], "n_chunks": rep["n_chunks"], "n_scored": rep["n_scored"]}


def stored_bytes(params) -> int:
    """Bytes of every array leaf as stored (packed codes, scales, masks; floats in their dtype)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params) if hasattr(x, "dtype")))


def cache_bytes(model, params, cache_dtype) -> tuple[int, int]:
    """(bytes per cached position, fixed bytes) a decode step reads from one sequence's cache: a
    KV cache grows with the length, a recurrent state (Mamba mixers) does not; a hybrid has both."""
    def nbytes(max_len):
        cache = jax.eval_shape(lambda: model.init_cache(1, max_len, cache_dtype, params=params))
        return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(cache)
                       if hasattr(a, "shape") and len(a.shape) >= 2))

    one, two = nbytes(1), nbytes(2)
    return two - one, one - (two - one)


def copy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second by an XLA elementwise copy (best of a few timed batches)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * jnp.float32(1.0009765625))
    f(x).block_until_ready()
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            y = f(x)
        y.block_until_ready()
        best = max(best, 2 * x.nbytes * 5 / (time.perf_counter() - t0))
    del x, y
    return best


def _executables_peak() -> int:
    """Largest XLA buffer assignment among the executables `generate` compiled for this row.
    (The ablation clears that cache before each row; see `reset_executables`.)"""
    from flashit_jax import generate as gen

    return max((_peak(e) for e in gen._EXECUTABLES.values()), default=0)


def reset_executables() -> None:
    from flashit_jax import generate as gen

    gen._EXECUTABLES.clear()


def _peak(compiled) -> int:
    try:
        m = compiled.memory_analysis()
    except Exception:  # a backend without the analysis
        return 0
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _prefill_fn(model, attn_impl):
    def prefill(params, tokens, cache):
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        logits, cache, _ = model.forward(params, tokens, cache=cache, logits_at=lengths - 1, seq_lengths=lengths,
                                         attn_impl=attn_impl)
        return logits, cache

    return jax.jit(prefill, donate_argnums=(2,))


def prefill_speed(built, tokens: np.ndarray, reps: int = 3) -> tuple[float, int]:
    """(tokens/s, peak bytes) of a batched prefill of `tokens` [B, T]."""
    b, t = tokens.shape
    with runtime(built.kernels) as attn:
        fn = _prefill_fn(built.model, attn)
        dtype = built.cache_dtype or _compute_dtype(built.params)
        cache = built.model.init_cache(b, t, dtype, params=built.params)
        toks = jnp.asarray(tokens, jnp.int32)
        compiled = fn.lower(built.params, toks, cache).compile()
    times = []
    for i in range(reps + 1):  # the first call warms the runtime (thread pools, allocator) and is not timed
        cache = built.model.init_cache(b, t, dtype, params=built.params)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        logits, cache = compiled(built.params, toks, cache)
        logits.block_until_ready()
        if i:
            times.append(time.perf_counter() - t0)
    del cache
    return b * t / statistics.median(times), _peak(compiled)


def _compute_dtype(params):
    return jax.tree.leaves(params["embed"])[0].dtype if "embed" in params else jnp.float32


def decode_speed(built, prompt: list[int], new_tokens: int, runs: int = 2) -> dict:
    """Decode tokens/s, TTFT and forward passes per second for one prompt (batch 1)."""
    from flashit_jax.generate import generate

    best = None
    with runtime(built.kernels) as attn:
        for _ in range(runs):
            d = built.decoding
            if d is None:
                r = generate(built.model, built.params, [prompt], max_new_tokens=new_tokens, eos_id=None,
                             cache_dtype=built.cache_dtype, attn_impl=attn, steps_per_call=16)
                res = {"decode_tps": r.tokens_per_s, "ttft_s": r.ttft_s, "forwards_per_s": r.tokens_per_s,
                       "tokens": r.tokens[0].tolist(), "compile_s": r.compile_s}
            else:
                r = _drafted(built, d, prompt, new_tokens, attn)
                rounds = int(r.rounds.sum())
                res = {"decode_tps": r.tokens_per_s, "ttft_s": r.ttft_s, "forwards_per_s": rounds / r.decode_s,
                       "tokens": r.tokens[0].tolist(), "compile_s": r.compile_s, "tokens_per_round": r.tokens_per_step,
                       "acceptance": r.acceptance_rate, "round_s": r.decode_s / max(rounds, 1), "gamma": r.gamma}
            if best is None or res["decode_tps"] > best["decode_tps"]:
                best = res
    best["peak_bytes"] = _executables_peak()
    return best


def _drafted(built, d, prompt, new_tokens, attn):
    drafter = d.make(built.model, built.params)
    if d.kind == "medusa":
        from flashit_jax.decoding.medusa import medusa_generate

        return medusa_generate(built.model, built.params, drafter, [prompt], max_new_tokens=new_tokens,
                               cache_dtype=built.cache_dtype, attn_impl=attn)
    from flashit_jax.decoding import speculative_generate

    return speculative_generate(built.model, built.params, [prompt], draft=drafter, gamma=d.gamma,
                                max_new_tokens=new_tokens, cache_dtype=built.cache_dtype, attn_impl=attn)


def speed(built, *, prompt: list[int], prefill_tokens: np.ndarray, new_tokens: int, bandwidth: float,
          decode_runs: int = 2) -> dict:
    """All speed columns of a row (see the module doc)."""
    if len(prompt) < 2:
        raise FlashitError("the speed prompt needs at least 2 tokens")
    prefill_tps, prefill_peak = prefill_speed(built, prefill_tokens)
    dec = decode_speed(built, prompt, new_tokens, decode_runs)
    per_pos, fixed = cache_bytes(built.model, built.params, built.cache_dtype or _compute_dtype(built.params))
    mean_len = len(prompt) + new_tokens / 2
    bytes_per_forward = stored_bytes(built.params) + per_pos * mean_len + fixed
    out = {"prefill_tps": prefill_tps, "decode_tps": dec["decode_tps"], "ttft_ms": 1e3 * dec["ttft_s"],
           "peak_mem_mb": max(prefill_peak, dec["peak_bytes"]) / 1e6,
           "mbu": bytes_per_forward * dec["forwards_per_s"] / bandwidth, "bytes_per_forward": bytes_per_forward,
           "forwards_per_s": dec["forwards_per_s"], "compile_s": dec["compile_s"], "first_tokens": dec["tokens"][:16]}
    for k in ("tokens_per_round", "acceptance", "round_s", "gamma"):
        if k in dec:
            out[k] = dec[k]
    return out
