"""Batched autoregressive generation with a static, pre-allocated KV cache.

One jitted prefill (right-padded prompts of different lengths, logits only at each prompt's
last token) and one jitted decode step (the cache donated, so it is updated in place).
Sampling: greedy (temperature 0), temperature, top-k, top-p; the warpers are shared with
speculative decoding so that draft and target see the same distribution.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.sharding import constrain_batch, constrain_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """fp32 logits after temperature, top-k and top-p; excluded tokens get -inf."""
    x = logits.astype(jnp.float32)
    if s.greedy:
        return x
    x = x / jnp.float32(s.temperature)
    if s.top_k:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        keep = (cum - jax.nn.softmax(sorted_x, axis=-1)) < jnp.float32(s.top_p)
        cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return x


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """int32 tokens from logits [..., V]."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp_logits(logits, s), axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerateResult:
    tokens: np.ndarray  # int32 [B, max_new_tokens]; after EOS, filled with EOS
    lengths: np.ndarray  # int32 [B]: generated tokens, EOS included
    ttft_s: float  # prefill + first token, compiled
    decode_s: float
    tokens_per_s: float  # decode throughput: batch x decode steps / decode time
    steps: int
    compile_s: float


def _switches() -> tuple:
    """What is read while tracing and changes the program: the project's environment switches
    (FLASHIT_JAX_GEMV, _GEMV_Q4, _GEMV_MAX_ROWS, ...: all of them, so a new one cannot be forgotten) and
    the implementation set by `qarray.matmul_impl`. `_compiled` passes it to every function it compiles
    as a static argument they do not read: jit's own trace cache keys on static arguments, not on this
    global state, and without it a RECIPE@xla benchmark row traced nothing new and ran the RECIPE row's
    program again (on an H200 on 2026-12-05 too, after a fix that keyed only `_EXECUTABLES` on it)."""
    import os

    from flashit_jax.nn import qarray

    return (tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("FLASHIT_JAX_"))),
            qarray.current_matmul_impl())


@functools.partial(jax.jit, static_argnames=("model", "sampling", "attn_impl", "switches"),
                   donate_argnames=("cache",))
def _prefill(params, tokens, lengths, cache, key, *, model, sampling, attn_impl, switches=()):
    del switches  # a jit cache key only (`_switches`)
    logits, cache, _ = model.forward(params, tokens, cache=cache, logits_at=lengths - 1, seq_lengths=lengths,
                                     attn_impl=attn_impl)
    return constrain_batch(sample(logits[:, 0], key, sampling)), constrain_cache(cache)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "eos_id", "attn_impl", "steps", "switches"),
                   donate_argnames=("cache",))
def _decode(params, cache, tok, done, key, *, model, sampling, eos_id, attn_impl, steps, switches=()):
    """`steps` decode steps in one call (a scan when > 1): fewer dispatches per token.
    Returns (tokens [B, steps], the last of them [B], cache, done)."""
    del switches  # a jit cache key only (`_switches`)

    def step(carry, k):
        tok, cache, done = carry
        logits, cache, _ = model.forward(params, tok[:, None], cache=cache, attn_impl=attn_impl)
        nxt = sample(logits[:, 0], k, sampling)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        return (nxt, cache, done), nxt

    if steps == 1:
        (tok, cache, done), _ = step((tok, cache, done), key)
        toks = tok[:, None]
    else:
        (tok, cache, done), toks = jax.lax.scan(step, (tok, cache, done), jax.random.split(key, steps))
        toks = toks.T
    return constrain_batch(toks), constrain_batch(tok), constrain_cache(cache), constrain_batch(done)


_EXECUTABLES: dict = {}


def _compiled(fn, *args, **statics):
    """AOT-compiled `fn` for these argument shapes, compiled once per process (repeated
    `generate` calls, benchmarks, speculative decoding reuse it)."""
    # leaves only: rebuilding a packed weight type around (shape, dtype) tuples (tree.map) breaks its repr;
    # shardings too: the same shapes on another mesh (1 GPU, then tensor-parallel) need their own executable
    leaves = jax.tree.leaves(args)
    sig = [(a.shape, str(a.dtype)) if hasattr(a, "shape") else a for a in leaves]
    placement = tuple(getattr(a, "sharding", None) for a in leaves)
    statics = {**statics, "switches": _switches()}
    key = (fn, jax.tree.structure(args), str(sig), placement, tuple(sorted(statics.items())))
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = fn.lower(*args, **statics).compile()
    return _EXECUTABLES[key]


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def generate(model, params, prompts, *, max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | None = None, cache_dtype=None, seed: int = 0, max_len: int | None = None,
             attn_impl: str = "auto", pad_multiple: int = 64, steps_per_call: int = 1,
             mesh=None) -> GenerateResult:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids, lengths may differ).

    steps_per_call > 1 runs that many decode steps per jitted call (a `lax.scan`), checking for
    EOS between calls; greedy tokens are the same (sampling draws differ, still seeded).
    mesh: decode on this mesh (e.g. `make_mesh(data=1, tensor=2)`: tensor parallelism) with
    `params` already placed there (`sharding.shard_params`); the cache is placed by
    `sharding.CACHE_AXES` (KV heads over `tensor`) and XLA inserts the collectives.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FlashitError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise FlashitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    longest = int(lens.max())
    if steps_per_call < 1:
        raise FlashitError(f"steps_per_call must be >= 1, got {steps_per_call}")
    n_calls = -(-(max_new_tokens - 1) // steps_per_call)
    need = longest + 1 + n_calls * steps_per_call
    max_len = max_len or _bucket(need, 128)
    if need > max_len:
        raise FlashitError(f"prompt of {longest} tokens + {max_new_tokens} new tokens does not fit the cache of "
                           f"{max_len} positions")
    width = min(_bucket(longest, pad_multiple), max_len)
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    if cache_dtype is None:
        cache_dtype = params["embed"]["w"].dtype  # the compute dtype, also for a quantized table
    key = jax.random.key(seed)
    cache = model.init_cache(b, max_len, cache_dtype, params=params)
    if mesh is not None:
        from flashit_jax import sharding as shd

        cache = shd.shard_cache(cache, mesh)

        def put(x):  # per-row inputs where the steps keep them (constrain_batch): rows over the batch axes
            return jax.device_put(x, jax.sharding.NamedSharding(mesh, shd.batch_spec(mesh, x.shape)))

        with jax.set_mesh(mesh):  # traced under the mesh: `auto` kernels choose partitionable ops
            return _generate(model, params, cache, tokens, lens, key, max_new_tokens, sampling, eos_id, attn_impl,
                             steps_per_call, n_calls, put)
    return _generate(model, params, cache, tokens, lens, key, max_new_tokens, sampling, eos_id, attn_impl,
                     steps_per_call, n_calls, jnp.asarray)


def _generate(model, params, cache, tokens, lens, key, max_new_tokens, sampling, eos_id, attn_impl, steps_per_call,
              n_calls, put) -> GenerateResult:
    b = tokens.shape[0]
    statics = dict(model=model, sampling=sampling, attn_impl=attn_impl)
    tokens, lens = put(tokens), put(lens)
    t0 = time.perf_counter()
    prefill = _compiled(_prefill, params, tokens, lens, cache, key, **statics)
    done0 = put(np.zeros((b,), bool))
    step = _compiled(_decode, params, cache, put(np.zeros((b,), np.int32)), done0, key, eos_id=eos_id,
                     steps=steps_per_call, **statics)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok, cache = prefill(params, tokens, lens, cache, jax.random.fold_in(key, 0))
    tok.block_until_ready()
    ttft = time.perf_counter() - t0
    done = done0 if eos_id is None else put(tok == eos_id)
    out = [tok[:, None]]
    check_every = max(1, 16 // steps_per_call)  # reading `done` syncs with the device: not every step
    t0 = time.perf_counter()
    for i in range(n_calls):
        toks, tok, cache, done = step(params, cache, tok, done, jax.random.fold_in(key, i + 1))
        out.append(toks)
        if eos_id is not None and (i + 1) % check_every == 0 and bool(done.all()):
            break
    toks = np.asarray(jnp.concatenate(out, axis=1))
    decode_s = time.perf_counter() - t0
    steps = toks.shape[1] - 1
    toks = toks[:, :max_new_tokens]
    lengths = np.full((b,), toks.shape[1], np.int32)
    if eos_id is not None:
        hit = toks == eos_id
        lengths = np.where(hit.any(1), hit.argmax(1) + 1, toks.shape[1]).astype(np.int32)
        pad = np.full((b, max_new_tokens - toks.shape[1]), eos_id, np.int32)
        toks = np.concatenate([toks, pad], axis=1)
    return GenerateResult(tokens=toks, lengths=lengths, ttft_s=ttft, decode_s=decode_s,
                          tokens_per_s=b * steps / decode_s if steps else 0.0, steps=steps, compile_s=compile_s)
