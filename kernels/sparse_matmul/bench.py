"""Sparse decode kernels on the device: correctness vs the XLA reference, then timings.

    python -m kernels.sparse_matmul.bench           # GPU: Llama-3.2-1B matrix shapes at M = 1
    python -m kernels.sparse_matmul.bench --smoke   # CPU: tiny shapes, Pallas interpreter (tests the script)

Per shape [K, N] (bf16): the dense XLA dot (the baseline every ratio divides), the activation-
sparse kernel at several fractions of dropped inputs, XLA's best sparse alternative (top-k
gather of the surviving rows, `reference.act_sparse_gather_matmul`), the 2:4 kernel and XLA's
2:4 (decompress + dot). Timing as in `kernels.qmatmul.bench`: a chain of calls with rotated
weight sets (more bytes than the L2 holds) in one jit, median of reps.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.qmatmul.bench import chain_time, rel_err
from kernels.sparse_matmul import api, reference as ref


def threshold_for(xs, fraction: float) -> float:
    """|x| quantile dropping `fraction` of the inputs (fraction 0: nothing dropped)."""
    if fraction <= 0:
        return -1.0
    a = np.sort(np.abs(np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in xs])))
    return float(a[min(len(a) - 1, int(np.ceil(fraction * len(a))) - 1)])


def nm_weight(key, k, n, dtype):
    w = jax.random.normal(key, (k, n), jnp.float32) / k**0.5
    g = jnp.abs(w).reshape(k // 4, 4, n)
    keep = (jnp.argsort(jnp.argsort(-g, axis=1), axis=1) < 2).reshape(k, n)
    return ref.nm_compress(w.astype(dtype), keep, 2, 4)


def check(cases, impl: str, log) -> bool:
    """Kernel vs reference in fp32: bf16 inputs, fp32 accumulation in both, so < 1e-2 relative
    covers the bf16 output rounding; fp32 inputs < 1e-4 (summation order)."""
    ok = True
    for i, (m, k, n, dtype) in enumerate(cases):
        key = jax.random.key(10 + i)
        x = jax.random.normal(key, (m, k), jnp.float32).astype(dtype)
        w = (jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.float32) / k**0.5).astype(dtype)
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
        t = threshold_for([x], 0.5)
        want = ref.act_sparse_matmul(x.astype(jnp.float32), w.astype(jnp.float32), t)
        got = jax.jit(lambda x, w: api.act_sparse_matmul(x, w, t, out_dtype=jnp.float32, impl=impl))(x, w)
        err = rel_err(got, want)
        good = err < tol
        values, meta = nm_weight(jax.random.fold_in(key, 2), k, n, dtype)
        want2 = ref.nm_matmul(x.astype(jnp.float32), values.astype(jnp.float32), meta, n=2, m=4)
        got2 = jax.jit(lambda x, v, mt: api.nm_matmul(x, v, mt, n=2, m=4, out_dtype=jnp.float32, impl=impl))(
            x, values, meta)
        err2 = rel_err(got2, want2)
        good &= err2 < tol
        ok &= good
        log(f"check M={m} K={k} N={n} {jnp.dtype(dtype).name}: act-sparse 50% rel err {err:.2e}, 2:4 rel err "
            f"{err2:.2e} (tol {tol:.0e}) {'PASS' if good else 'FAIL'}")
    return ok


def bench(shapes, fractions, impl: str, chain: int, n_sets: int, log, reps: int = 5) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    dt = jnp.bfloat16
    for k, n in shapes:
        dense = [(jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) / k**0.5).astype(dt)
                 for i in range(n_sets)]
        xs = [jax.random.normal(jax.random.fold_in(key, 1000 + j), (1, k), jnp.float32).astype(dt)
              for j in range(chain)]
        t_dense = chain_time(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
                             xs, [(w,) for w in dense], reps)
        row = {"k": k, "n": n, "dense_us": t_dense * 1e6, "act": {}}
        parts = [f"dense {t_dense * 1e6:.1f} us"]
        for f in fractions:
            t = threshold_for(xs, f)
            cap = max(1, int(round((1 - f) * k)))
            t_k = chain_time(lambda x, w, _t=t: api.act_sparse_matmul(x, w, _t, impl=impl), xs,
                             [(w,) for w in dense], reps)
            t_g = chain_time(lambda x, w, _t=t, _c=cap: ref.act_sparse_gather_matmul(x, w, _t, _c), xs,
                             [(w,) for w in dense], reps)
            row["act"][str(f)] = {"kernel_us": t_k * 1e6, "xla_gather_us": t_g * 1e6,
                                  "kernel_speedup": t_dense / t_k, "xla_gather_speedup": t_dense / t_g}
            parts.append(f"act {int(f * 100)}%: {t_k * 1e6:.1f} us ({t_dense / t_k:.2f}x; XLA gather "
                         f"{t_dense / t_g:.2f}x)")
        nm = [nm_weight(jax.random.fold_in(key, 50 + i), k, n, dt) for i in range(n_sets)]
        t_nm = chain_time(lambda x, v, mt: api.nm_matmul(x, v, mt, n=2, m=4, impl=impl), xs, nm, reps)
        t_nmx = chain_time(lambda x, v, mt: api.nm_matmul(x, v, mt, n=2, m=4, impl="xla"), xs, nm, reps)
        row.update(nm24_us=t_nm * 1e6, nm24_speedup=t_dense / t_nm, nm24_xla_us=t_nmx * 1e6,
                   nm24_xla_speedup=t_dense / t_nmx)
        parts.append(f"2:4 {t_nm * 1e6:.1f} us ({t_dense / t_nm:.2f}x; XLA decompress+dot {t_dense / t_nmx:.2f}x)")
        log(f"bench M=1 K={k} N={n}: " + " | ".join(parts))
        rows.append(row)
    return rows


def table(rows, fractions) -> list[str]:
    head = "| K x N | dense us | " + " | ".join(f"act {int(f * 100)}% kernel (x) | XLA gather (x)" for f in fractions)
    head += " | 2:4 kernel (x) | 2:4 XLA (x) |"
    out = [head, "|---" * (3 + 2 * len(fractions) + 1) + "|"]
    for r in rows:
        cells = [f"{r['k']}x{r['n']}", f"{r['dense_us']:.1f}"]
        for f in fractions:
            a = r["act"][str(f)]
            cells += [f"{a['kernel_us']:.1f} ({a['kernel_speedup']:.2f}x)",
                      f"{a['xla_gather_us']:.1f} ({a['xla_gather_speedup']:.2f}x)"]
        cells += [f"{r['nm24_us']:.1f} ({r['nm24_speedup']:.2f}x)", f"{r['nm24_xla_us']:.1f} ({r['nm24_xla_speedup']:.2f}x)"]
        out.append("| " + " | ".join(cells) + " |")
    return out


GPU_CASES = [(1, 2048, 8192, jnp.bfloat16), (1, 8192, 2048, jnp.bfloat16), (3, 2048, 512, jnp.bfloat16),
             (8, 576, 1536, jnp.float32), (1, 1536, 576, jnp.bfloat16)]
SMOKE_CASES = [(1, 128, 64, jnp.bfloat16), (3, 64, 32, jnp.float32)]
GPU_SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]  # Llama-3.2-1B: q/o, k/v, gate/up, down
FRACTIONS = (0.0, 0.5, 0.7)


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(prog="python -m kernels.sparse_matmul.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Pallas interpreter (CPU)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    impl = "interpret" if args.smoke else "pallas"
    ok = True if args.no_check else check(SMOKE_CASES if args.smoke else GPU_CASES, impl, log)
    if args.smoke:
        rows = bench([(128, 64)], FRACTIONS, impl, chain=2, n_sets=2, log=log, reps=1)
    else:
        rows = bench(GPU_SHAPES, FRACTIONS, impl, chain=24, n_sets=4, log=log)
    for line in table(rows, FRACTIONS):
        log(line)
    return ok, rows


if __name__ == "__main__":
    main()
