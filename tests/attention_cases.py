"""Attention kernel test cases shared by the CPU (interpret) tests and the GPU tests.

Factors: head_dim, GQA ratio, causal, window, segment ids, softcap, layout, dtype. The default run takes
a pairwise cover of them (every pair of levels appears at least once); `FULL` is the product.

Layouts: "default" (q_positions=None, kv_lengths=None, T not a multiple of any block),
"ragged" (per-sequence kv_lengths below Tk, one sequence with no valid key at all),
"cache" (a few queries at slots lengths-Tq.. of a longer cache, as in chunked prefill/verify).

Tolerances: ||kernel - ref|| / ||ref|| against the fp32 reference on the same (rounded) inputs.
fp32 runs true fp32 matmuls (1e-5 forward; gradients sum more terms in a different order: 1e-4);
fp16 keeps 11 bits but p and dS are rounded to it before their matmuls (4e-3 / 1e-2); bf16 keeps
8 bits (2e-2 / 4e-2). The XLA path in the same dtype lands in the same ranges.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import reference

FACTORS = {
    "head_dim": (64, 128, 256),
    "group": (1, 4, 8),
    "causal": (True, False),
    "window": (None, 16),
    "segments": (False, True),
    "softcap": (None, 20.0),
    "layout": ("default", "ragged", "cache"),
    "dtype": ("float32", "bfloat16", "float16"),
}
TOL = {"float32": (1e-5, 1e-4), "float16": (4e-3, 1e-2), "bfloat16": (2e-2, 4e-2)}


def _pairwise(factors: dict) -> list[dict]:
    """Greedy pairwise cover, deterministic."""
    names = list(factors)
    todo = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in factors[a] for vb in factors[b]}
    product = [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]
    cases = []
    while todo:
        def gain(c):
            return sum((a, c[a], b, c[b]) in todo for a, b in itertools.combinations(names, 2))

        best = max(product, key=gain)
        cases.append(best)
        todo -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


PAIRWISE = _pairwise(FACTORS)
FULL = [dict(zip(FACTORS, vals)) for vals in itertools.product(*FACTORS.values())]

# The Mosaic GPU kernel serves the default layout (no segment ids) in 16-bit types.
MGPU_FACTORS = {k: v for k, v in FACTORS.items() if k not in ("segments", "layout", "dtype")}
MGPU_FACTORS["dtype"] = ("bfloat16", "float16")
MGPU_PAIRWISE = [dict(c, segments=False, layout="default") for c in _pairwise(MGPU_FACTORS)]
MGPU_FULL = [dict(zip(MGPU_FACTORS, v), segments=False, layout="default")
             for v in itertools.product(*MGPU_FACTORS.values())]


def half_slow(cover: list[dict], keep: int) -> list:
    """Pytest params of a cover with every second case (from index `keep`) in the default run and the others
    marked slow: two backends given opposite halves check every case of the cover in CI's default run between
    them (kept under 15 minutes on 2 cores), and each backend the whole cover with `-m slow`."""
    import pytest

    return [pytest.param(c, id=case_id(c), marks=() if i % 2 == keep else pytest.mark.slow) for i, c in enumerate(cover)]


def case_id(c: dict) -> str:
    return (f"d{c['head_dim']}-g{c['group']}-{'causal' if c['causal'] else 'full'}-w{c['window']}-"
            f"{'seg' if c['segments'] else 'noseg'}-cap{c['softcap']}-{c['layout']}-{c['dtype']}")


def make(c: dict, seed: int = 0, *, tq: int | None = None, tk: int | None = None):
    """Inputs, kwargs and cotangents for one case. Returns (q, k, v, kw, do, dlse)."""
    dtype = jnp.dtype(c["dtype"])
    b, hkv, d = 2, 2, c["head_dim"]
    hq = hkv * c["group"]
    layout = c["layout"]
    if layout == "cache":
        tq, tk = tq or 9, tk or 80
    else:
        tq = tk = tq or 45
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, tq, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, hkv, d), jnp.float32).astype(dtype)
    kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], q_positions=None, kv_lengths=None)
    if layout == "ragged":
        kw["kv_lengths"] = jnp.asarray([tk - 7, 0], jnp.int32)
        kw["q_positions"] = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
    elif layout == "cache":
        lens = jnp.asarray([tk - 3, 40], jnp.int32)
        kw["kv_lengths"] = lens
        kw["q_positions"] = (lens[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None]).astype(jnp.int32)
    if c["segments"]:
        if tq == tk:
            seg = jnp.stack([(jnp.arange(tq) >= 20).astype(jnp.int32), (jnp.arange(tq) // 7).astype(jnp.int32)])
            kw["segment_ids"] = seg
        else:
            kv_seg = jnp.broadcast_to((jnp.arange(tk) >= 30).astype(jnp.int32), (b, tk))
            kw["segment_ids"] = (jnp.ones((b, tq), jnp.int32), kv_seg)
    do = jax.random.normal(ks[3], (b, tq, hq, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(ks[4], (b, hq, tq), jnp.float32)
    return q, k, v, kw, do, dlse


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(fn, c: dict, seed: int = 0, grads: bool = True, **size):
    """Assert fn (with `reference.attention`'s signature) matches the fp32 reference: out, lse, dq, dk, dv."""
    q, k, v, kw, do, dlse = make(c, seed, **size)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    tol_f, tol_b = TOL[c["dtype"]]
    # Rows with no visible key have lse = -inf: their lse cotangent must be zero.
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    qpos = reference.default_positions(b, tq) if kw["q_positions"] is None else kw["q_positions"]
    kvlen = jnp.full((b,), tk, jnp.int32) if kw["kv_lengths"] is None else kw["kv_lengths"]
    seen = reference.build_mask(qpos, kvlen, tk, causal=kw["causal"], window=kw["window"],
                                segment_ids=kw.get("segment_ids")).any(-1)  # [B, 1, Tq]
    dlse = jnp.where(seen, dlse, 0.0)

    # One jitted vjp per implementation: compiled once (interpret mode is compile-bound).
    def run(f, cast, q, k, v):
        (o, l), vjp = jax.vjp(lambda q, k, v: f(cast(q), cast(k), cast(v), return_lse=True, **kw), q, k, v)
        return o, l, vjp((do.astype(o.dtype), dlse)) if grads else None

    run = jax.jit(run, static_argnums=(0, 1))
    out, lse, got = run(fn, lambda x: x, q, k, v)
    ref_out, ref_lse, want = run(reference.attention, f32, f32(q), f32(k), f32(v))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    e = _rel(f32(out), ref_out)
    assert e < tol_f, f"out: rel err {e:.2e} >= {tol_f}"
    finite = jnp.isfinite(ref_lse)
    assert bool(jnp.all(finite == jnp.isfinite(lse))), "rows without keys must have lse = -inf exactly there"
    e = _rel(jnp.where(finite, lse, 0.0), jnp.where(finite, ref_lse, 0.0))
    assert e < tol_f, f"lse: rel err {e:.2e}"
    if not grads:
        return
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == q.dtype
        e = _rel(f32(g), w)
        assert e < tol_b, f"d{name}: rel err {e:.2e} >= {tol_b}"
