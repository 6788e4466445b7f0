"""Ternary (BitNet b1.58) matmul on the device: correctness vs the XLA reference, then timings.

    python -m kernels.ternary.bench --out $OUT           # GPU: check, then kernel vs XLA bf16 at M = 1..4096
    python -m kernels.ternary.bench --smoke --out /tmp/t  # CPU: tiny shapes, Pallas interpreter (tests the script)

Variants, all timed in the same run on the same shapes (ratio = XLA bf16 time / variant time):
  bf16        XLA dot of bf16 activations and a dense bf16 [K, N] weight (the baseline)
  ternary     BitLinear with the Pallas kernel: per-token int8 quantization of x + packed 2-bit matmul
  kernel      the Pallas kernel alone on pre-quantized int8 activations
  xla_packed  the XLA fallback: unpack the 2-bit weight, int8 dot (what runs without the kernel)
  xla_int8    XLA int8 x int8 dot on ternary weights stored unpacked as int8 (4x the bytes)
Timing: `chain` calls with distinct activations and rotated weight sets (more bytes than the L2
holds) in one jit; median of `reps` runs divided by `chain`. Results: OUT/ternary_bench.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from kernels.ternary import api, gpu
from kernels.ternary import reference as ref


def random_ternary(key, k, n):
    codes = jax.random.randint(key, (k, n), 0, 3, jnp.int32)  # t + 1
    t = (codes - 1).astype(jnp.int8)
    return t, ref.pack(t)


def check(cases, impl, log) -> bool:
    """Kernel vs reference: int32 accumulation is exact in both, so only the fp32 epilogue may differ."""
    ok = True
    for i, (m, k, n) in enumerate(cases):
        key = jax.random.key(10 + i)
        x = jax.random.normal(key, (m, k), jnp.float32)
        xq, sx = ref.quantize_rows_int8(x)
        _, p = random_ternary(jax.random.fold_in(key, 1), k, n)
        sw = jax.random.uniform(jax.random.fold_in(key, 2), (1, 1), jnp.float32, 0.01, 0.1)
        try:
            want = jax.jit(lambda a, b, c, d, n=n: ref.ternary_matmul(a, b, c, d, n=n))(xq, sx, p, sw)
            got = jax.jit(lambda a, b, c, d, n=n: api.ternary_matmul(a, b, c, d, n=n, impl=impl))(xq, sx, p, sw)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))
            good = err < 1e-6 and got.shape == (m, n)
        except Exception as e:  # a failing shape is reported, the rest still runs
            err, good = float("nan"), False
            log(f"check M={m} K={k} N={n}: {type(e).__name__}: {e}")
        ok &= good
        log(f"check ternary M={m} K={k} N={n} blocks {gpu.default_blocks(m, k, n // 4)}: "
            f"max rel err {err:.1e} (tol 1e-6) {'PASS' if good else 'FAIL'}")
    return ok


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chain_time(call, xs, weights, reps: int) -> float:
    """Seconds per call of call(x, *w) over len(xs) calls in one jit (every output used)."""

    @jax.jit
    def run(xs, weights):
        cols = [call(x, *weights[i % len(weights)])[:, :1].astype(jnp.float32) for i, x in enumerate(xs)]
        return jnp.concatenate(cols, axis=1)

    return _time(run, (xs, weights), reps) / len(xs)


def bench_shape(m, k, n, impl, chain, n_sets, reps, log) -> dict:
    key = jax.random.key(m * 7 + k + n)
    sets = [random_ternary(jax.random.fold_in(key, i), k, n) for i in range(n_sets)]
    sw = jnp.full((1, 1), 0.02, jnp.float32)
    dense = [(t.astype(jnp.bfloat16) * jnp.bfloat16(0.02),) for t, _ in sets]
    packed = [(p,) for _, p in sets]
    unpacked = [(t,) for t, _ in sets]
    xs = [jax.random.normal(jax.random.fold_in(key, 1000 + j), (m, k), jnp.float32).astype(jnp.bfloat16)
          for j in range(chain)]
    xqs = [ref.quantize_rows_int8(x) for x in xs]
    variants = {
        "bf16": (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16), xs, dense),
        "ternary": (lambda x, p: api.linear(x, p, sw, n=n, impl=impl), xs, packed),
        "kernel": (lambda xq_sx, p: api.ternary_matmul(xq_sx[0], xq_sx[1], p, sw, n=n, out_dtype=jnp.bfloat16,
                                                       impl=impl), xqs, packed),
        "xla_packed": (lambda x, p: api.linear(x, p, sw, n=n, impl="xla"), xs, packed),
        "xla_int8": (lambda xq_sx, t: ref.int8_matmul_unpacked(xq_sx[0], xq_sx[1], t, sw), xqs, unpacked),
    }
    row = {"m": m, "k": k, "n": n, "blocks": str(gpu.default_blocks(m, k, n // 4))}
    for name, (call, ins, ws) in variants.items():
        try:
            row[f"{name}_us"] = chain_time(call, ins, ws, reps) * 1e6
        except Exception as e:
            row[f"{name}_us"] = float("nan")
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {name} M={m} K={k} N={n} failed: {row[f'{name}_error']}")
    base = row["bf16_us"]
    for name in variants:
        if name != "bf16":
            row[f"{name}_speedup"] = base / row[f"{name}_us"]
    row["kernel_weight_GBps"] = k * n / 4 / (row["kernel_us"] * 1e-6) / 1e9
    row["bf16_weight_GBps"] = k * n * 2 / (base * 1e-6) / 1e9
    log(f"bench M={m} K={k} N={n}: bf16 {base:.1f} us | ternary (quant+kernel) {row['ternary_us']:.1f} us "
        f"({row['ternary_speedup']:.2f}x) | kernel {row['kernel_us']:.1f} us ({row['kernel_speedup']:.2f}x) | "
        f"XLA packed {row['xla_packed_speedup']:.2f}x | XLA int8 {row['xla_int8_speedup']:.2f}x")
    return row


GPU_CHECKS = [(1, 576, 1536), (16, 1536, 576), (100, 576, 1536), (1, 4096, 14336), (512, 4096, 14336)]
GPU_SHAPES = [(576, 1536), (4096, 14336)]  # SmolLM2-135M MLP up; Llama-3-8B MLP up
GPU_MS = [1, 16, 512, 4096]
SMOKE_CHECKS = [(1, 64, 64), (5, 128, 128)]


def table(rows) -> str:
    cols = ["bf16", "ternary", "kernel", "xla_packed", "xla_int8"]
    out = ["| M | K | N | " + " | ".join(f"{c} us" for c in cols) + " | ternary / bf16 speedup | kernel weight GB/s |",
           "|---:|---:|---:|" + "---:|" * (len(cols) + 2)]
    for r in rows:
        out.append(f"| {r['m']} | {r['k']} | {r['n']} | " + " | ".join(f"{r[c + '_us']:.1f}" for c in cols)
                   + f" | {r['ternary_speedup']:.2f}x | {r['kernel_weight_GBps']:.0f} |")
    return "\n".join(out)


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(prog="python -m kernels.ternary.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Pallas interpreter (CPU)")
    ap.add_argument("--out", default="out")
    ap.add_argument("--budget-s", type=float, default=200, help="stop starting new shapes after this")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    impl = "interpret" if args.smoke else "pallas"
    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {dev.platform}: {dev.device_kind}")
    ok = check(SMOKE_CHECKS if args.smoke else GPU_CHECKS, impl, log)
    rows = []
    shapes = [(m, 64, 128) for m in (1, 16)] if args.smoke else [(m, k, n) for k, n in GPU_SHAPES for m in GPU_MS]
    for m, k, n in shapes:
        if time.perf_counter() - t_start > args.budget_s:
            log(f"budget of {args.budget_s:.0f} s spent: skipping M={m} K={k} N={n} and later shapes")
            continue
        try:
            rows.append(bench_shape(m, k, n, impl, chain=2 if args.smoke else 16, n_sets=2 if args.smoke else 4,
                                    reps=1 if args.smoke else 5, log=log))
        except Exception:
            log(f"bench M={m} K={k} N={n} failed:\n{traceback.format_exc()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__, "check_ok": bool(ok),
              "rows": rows, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    (out / "ternary_bench.json").write_text(json.dumps(result, indent=1))
    text = table(rows) if rows else "(no timings)"
    (out / "ternary_bench.md").write_text(text + "\n")
    log(f"correctness: {'PASS' if ok else 'FAIL'}")
    log(text)
    return ok, rows


if __name__ == "__main__":
    main()
