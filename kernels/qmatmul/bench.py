"""Quantized matmul kernels on the device: correctness vs the XLA reference, then timings.

    python -m kernels.qmatmul.bench                 # GPU: check, then W4A16 / W8A16 vs bf16 at M = 1, 16, 256
    python -m kernels.qmatmul.bench --smoke         # CPU: tiny shapes, Pallas interpreter (tests the script)

Timing: `chain` calls with distinct activations and weight sets rotated (more bytes than the
L2 holds) inside one jitted function, so that launches queue back to back on the device and
host dispatch is paid once; median of `reps` runs, divided by `chain`. Every call's output is
used (one column each, concatenated at the end) so none is optimized away.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.qmatmul import api, reference as ref


def random_weight(key, k, n, bits, group, symmetric):
    """Packed codes, scales, zeros of random codes (not a quantized matrix: any codes are valid)."""
    packing = ref.packing_for(bits, symmetric)
    k1, k2, k3 = jax.random.split(key, 3)
    if packing == "i8":
        q = jax.random.randint(k1, (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    else:
        codes = jax.random.randint(k1, (k, n), 0, 1 << bits, jnp.int32)
        q = ref.pack(codes, packing)
    g = k // group
    s = (jax.random.uniform(k2, (g, n), jnp.float32, 0.5, 1.5) / (k**0.5 * (1 << (bits - 1)))).astype(jnp.float16)
    z = None if symmetric else (-(1 << (bits - 1)) * s.astype(jnp.float32)
                                * jax.random.uniform(k3, (g, n), jnp.float32, 0.9, 1.1)).astype(jnp.float16)
    return packing, q, s, z


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(cases, impl: str, log) -> bool:
    """Kernel vs XLA reference; bf16 activations: < 1e-2 relative (bf16 output rounding), fp32: < 1e-4."""
    ok = True
    for i, (m, k, n, bits, group, sym, dtype) in enumerate(cases):
        key = jax.random.key(100 + i)
        packing, q, s, z = random_weight(key, k, n, bits, group or k, sym)
        x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(dtype)
        kw = dict(bits=bits, packing=packing, n=n)
        # HIGHEST: XLA's default fp32 dot on GPUs is TF32 (on an H200, 2026-12-04, that reference put an fp32
        # case at 2.8e-4 from our exact-fp32 kernel); the check wants the fp32 product
        with jax.default_matmul_precision("highest"):
            want = jax.jit(lambda x, q, s, z: ref.qmatmul(x.astype(jnp.float32), q, s, z, **kw))(x, q, s, z)
        got = jax.jit(lambda x, q, s, z: api.qmatmul(x, q, s, z, impl=impl, **kw))(x, q, s, z)
        got = jnp.where(jnp.isfinite(got), got, jnp.inf)
        err = rel_err(got.astype(jnp.float32), want)
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
        good = err < tol and got.shape == (m, n)
        ok &= good
        log(f"check qmatmul M={m} K={k} N={n} w{bits} g{group or 'ch'} {'sym' if sym else 'asym'} "
            f"{jnp.dtype(dtype).name}: rel err {err:.2e} (tol {tol:.0e}) {'PASS' if good else 'FAIL'}")
    for m, k, n in [(1, 2048, 8192), (24, 576, 1536)]:
        key = jax.random.key(m + k)
        x = jax.random.normal(key, (m, k), jnp.float32) * 2
        xq, sx = ref.quantize_rows_int8(x)
        wq = jax.random.randint(jax.random.fold_in(key, 1), (k, n), -127, 128, jnp.int32).astype(jnp.int8)
        sw = jax.random.uniform(jax.random.fold_in(key, 2), (1, n), jnp.float32, 1e-3, 1e-2)
        want = jax.jit(ref.int8_matmul)(xq, sx, wq, sw)
        got = jax.jit(functools.partial(api.int8_matmul, impl=impl))(xq, sx, wq, sw)
        err = rel_err(got, want)
        good = err < 1e-5
        ok &= good
        log(f"check int8_matmul M={m} K={k} N={n}: rel err {err:.2e} (tol 1e-05) {'PASS' if good else 'FAIL'}")
    return ok


def _time(fn, args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chain_time(call, xs, weights, reps: int = 5) -> float:
    """Seconds per call of call(x, *w) over len(xs) calls in one jit."""

    @jax.jit
    def run(xs, weights):
        cols = [call(x, *weights[i % len(weights)])[:, :1] for i, x in enumerate(xs)]
        return jnp.concatenate(cols, axis=1)

    return _time(run, (xs, weights), reps) / len(xs)


def bench(ms, k: int, n: int, group: int, impl: str, chain: int, n_sets: int, log, reps: int = 5) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    dense = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) for i in range(max(2, n_sets // 2))]
    quant = {}
    for bits, sym, grp in [(4, False, group), (8, True, None)]:
        sets = [random_weight(jax.random.fold_in(key, 100 + bits * 10 + i), k, n, bits, grp or k, sym)
                for i in range(n_sets)]
        quant[bits] = (sets[0][0], [tuple(w for w in s[1:] if w is not None) for s in sets], sym)
    bytes_dense = k * n * 2
    for m in ms:
        xs = [jax.random.normal(jax.random.fold_in(key, 1000 + j), (m, k), jnp.float32).astype(jnp.bfloat16)
              for j in range(chain)]
        t_bf16 = chain_time(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
                            xs, [(w,) for w in dense], reps)
        row = {"m": m, "k": k, "n": n, "bf16_us": t_bf16 * 1e6,
               "bf16_GBps": (bytes_dense + m * (k + n) * 2) / t_bf16 / 1e9}
        for bits, (packing, sets, sym) in quant.items():
            def call(x, q, s, z=None, _impl=impl, _packing=packing, _bits=bits):
                return api.qmatmul(x, q, s, z, bits=_bits, packing=_packing, n=n, impl=_impl)

            def call_xla(x, q, s, z=None, _packing=packing, _bits=bits):
                return api.qmatmul(x, q, s, z, bits=_bits, packing=_packing, n=n, impl="xla")

            t_k = chain_time(call, xs, sets, reps)
            t_x = chain_time(call_xla, xs, sets, reps)
            wbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in sets[0])
            row[f"w{bits}_us"] = t_k * 1e6
            row[f"w{bits}_xla_us"] = t_x * 1e6
            row[f"w{bits}_GBps"] = (wbytes + m * (k + n) * 2) / t_k / 1e9
            row[f"w{bits}_speedup"] = t_bf16 / t_k
            row[f"w{bits}_xla_speedup"] = t_bf16 / t_x
        log(f"bench M={m} K={k} N={n}: bf16 {row['bf16_us']:.1f} us | W8A16 {row['w8_us']:.1f} us "
            f"({row['w8_speedup']:.2f}x; XLA dequant+dot {row['w8_xla_speedup']:.2f}x) | W4A16 g{group} "
            f"{row['w4_us']:.1f} us ({row['w4_speedup']:.2f}x; XLA {row['w4_xla_speedup']:.2f}x) | "
            f"W4 {row['w4_GBps']:.0f} GB/s")
        rows.append(row)
    return rows


GPU_CASES = [  # m, k, n, bits, group (None = per channel), symmetric, activation dtype
    (1, 4096, 14336, 4, 128, False, jnp.bfloat16), (16, 4096, 14336, 4, 128, False, jnp.bfloat16),
    (256, 4096, 14336, 4, 128, False, jnp.bfloat16), (1, 2048, 8192, 4, 128, False, jnp.bfloat16),
    (1, 8192, 2048, 4, 128, True, jnp.bfloat16), (3, 2048, 512, 8, None, True, jnp.bfloat16),
    (1, 2048, 128256, 8, None, True, jnp.bfloat16), (7, 576, 1536, 4, 64, False, jnp.float32),
    (40, 1536, 576, 8, 64, False, jnp.bfloat16),
]
SMOKE_CASES = [(1, 256, 128, 4, 64, False, jnp.bfloat16), (5, 128, 64, 8, None, True, jnp.float32)]


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(prog="python -m kernels.qmatmul.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Pallas interpreter (CPU)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    impl = "interpret" if args.smoke else "pallas"
    ok = True
    if not args.no_check:
        ok = check(SMOKE_CASES if args.smoke else GPU_CASES, impl, log)
    if args.smoke:
        rows = bench([1, 16], 256, 256, 64, impl, chain=2, n_sets=2, log=log, reps=1)
    else:
        rows = bench([1, 16, 256], 4096, 14336, 128, impl, chain=24, n_sets=4, log=log)
    return ok, rows


if __name__ == "__main__":
    main()
