"""AQLM decode kernel on the device: correctness vs the XLA reference, then timings in one run.

    python -m kernels.aqlm.bench --json $OUT/aqlm_bench.json     # GPU
    python -m kernels.aqlm.bench --smoke                          # CPU: tiny shapes, Pallas interpreter

For each shape and batch (rows = 1, 4): the Pallas lookup kernel, XLA's dequantize + dot (the
reference path), XLA's lookup form (table + gathers) and a bf16 dense matmul, as times and as
ratios measured in the same process. Random codes and codebooks (any codes are valid).
Timing as in `kernels.qmatmul.bench`: calls chained in one jit over weight sets larger than L2.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.aqlm import gpu
from kernels.aqlm import reference as ref
from kernels.qmatmul.bench import chain_time, rel_err


def random_aqlm(key, k, n, m=2, bits=8, d=8):
    k1, k2, k3 = jax.random.split(key, 3)
    codes = jax.random.randint(k1, (m, k // d, n), 0, 2**bits, jnp.int32).astype(ref.code_dtype(bits))
    cb = (jax.random.normal(k2, (m, 2**bits, d), jnp.float32) / np.sqrt(k)).astype(jnp.float16)
    s = jax.random.uniform(k3, (1, n), jnp.float32, 0.5, 1.5).astype(jnp.float16)
    return codes, cb, s


def check(cases, interpret: bool, log) -> bool:
    """Kernel vs fp32 XLA reference on the same x: fp32 sums in another order -> < 1e-4 (bf16 output: 1e-2)."""
    ok = True
    for i, (rows, k, n, m, bits, dtype) in enumerate(cases):
        key = jax.random.key(10 + i)
        codes, cb, s = random_aqlm(key, k, n, m, bits)
        x = jax.random.normal(jax.random.fold_in(key, 1), (rows, k), jnp.float32).astype(dtype)
        want = jax.jit(lambda x, c, b, s: ref.matmul(x.astype(jnp.float32), c, b, s))(x, codes, cb, s)
        got = jax.jit(lambda x, c, b, s: gpu.aqlm_matmul(x, c, b, s, interpret=interpret))(x, codes, cb, s)
        err = rel_err(jnp.where(jnp.isfinite(got), got, jnp.inf).astype(jnp.float32), want)
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
        good = err < tol and got.shape == (rows, n)
        ok &= good
        log(f"check aqlm rows={rows} K={k} N={n} {m}x{bits} {jnp.dtype(dtype).name}: rel err {err:.2e} "
            f"(tol {tol:.0e}) {'PASS' if good else 'FAIL'}")
    return ok


def bench(shapes, rows_list, *, interpret: bool, chain: int, n_sets: int, reps: int, log, sweep=()) -> list[dict]:
    out = []
    key = jax.random.key(0)
    for k, n in shapes:
        sets = [random_aqlm(jax.random.fold_in(key, 100 + i), k, n) for i in range(n_sets)]
        dense = [(jax.random.normal(jax.random.fold_in(key, 200 + i), (k, n), jnp.bfloat16),)
                 for i in range(max(2, n_sets // 4))]
        for rows in rows_list:
            xs = [jax.random.normal(jax.random.fold_in(key, 1000 + j), (rows, k), jnp.float32).astype(jnp.bfloat16)
                  for j in range(chain)]
            t = {
                "kernel": chain_time(lambda x, c, b, s: gpu.aqlm_matmul(x, c, b, s, interpret=interpret), xs, sets,
                                     reps),
                "xla_dequant_dot": chain_time(lambda x, c, b, s: ref.matmul(x, c, b, s), xs, sets, reps),
                "xla_lut": chain_time(lambda x, c, b, s: ref.matmul_lut(x, c, b, s), xs, sets, reps),
                "bf16_dense": chain_time(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                                         .astype(x.dtype), xs, dense, reps),
            }
            best_cfg = None
            for cfg in sweep:
                if gpu.supported(rows, k // 8, n, cfg):
                    continue
                tc = chain_time(lambda x, c, b, s, cfg=cfg: gpu.aqlm_matmul(x, c, b, s, blocks=cfg, interpret=interpret),
                                xs, sets, reps)
                log(f"  sweep K={k} N={n} rows={rows} {cfg}: {tc * 1e6:.1f} us")
                if best_cfg is None or tc < best_cfg[0]:
                    best_cfg = (tc, cfg)
            code_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in sets[0])
            row = {"k": k, "n": n, "rows": rows, **{f"{name}_us": v * 1e6 for name, v in t.items()},
                   "kernel_vs_xla_dequant_dot": t["xla_dequant_dot"] / t["kernel"],
                   "kernel_vs_xla_lut": t["xla_lut"] / t["kernel"],
                   "kernel_vs_bf16": t["bf16_dense"] / t["kernel"],
                   "kernel_GBps": code_bytes / t["kernel"] / 1e9, "blocks": repr(gpu.default_blocks(rows, k // 8, n))}
            if best_cfg:
                row["best_sweep_us"] = best_cfg[0] * 1e6
                row["best_sweep_blocks"] = repr(best_cfg[1])
            log(f"bench K={k} N={n} rows={rows}: kernel {row['kernel_us']:.1f} us | XLA dequant+dot "
                f"{row['xla_dequant_dot_us']:.1f} us ({row['kernel_vs_xla_dequant_dot']:.2f}x) | XLA LUT "
                f"{row['xla_lut_us']:.1f} us ({row['kernel_vs_xla_lut']:.2f}x) | bf16 dense {row['bf16_dense_us']:.1f} "
                f"us ({row['kernel_vs_bf16']:.2f}x) | codes {row['kernel_GBps']:.0f} GB/s")
            out.append(row)
    return out


GPU_CASES = [(1, 4096, 14336, 2, 8, jnp.bfloat16), (4, 14336, 4096, 2, 8, jnp.bfloat16),
             (1, 576, 1536, 2, 8, jnp.float32), (8, 1536, 576, 1, 16, jnp.bfloat16), (2, 2048, 512, 3, 4, jnp.float32)]
SMOKE_CASES = [(1, 256, 128, 2, 8, jnp.bfloat16), (3, 128, 64, 1, 12, jnp.float32)]


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(prog="python -m kernels.aqlm.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Pallas interpreter (CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    lines = []

    def say(s):
        lines.append(s)
        log(s, flush=True) if log is print else log(s)

    say(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    ok = check(SMOKE_CASES if args.smoke else GPU_CASES, args.smoke, say)
    if args.smoke:
        rows = bench([(256, 128)], [1, 4], interpret=True, chain=2, n_sets=2, reps=1, log=say,
                     sweep=(gpu.BlockSizes(block_n=64, block_g=8, k_splits=2), gpu.BlockSizes(block_n=48)))
    else:
        # the table first (a timeout still leaves it in the log), then a small block-size sweep
        rows = bench([(4096, 14336), (14336, 4096), (4096, 4096), (576, 1536)], [1, 4], interpret=False,
                     chain=16, n_sets=8, reps=5, log=say)
        sweep = tuple(gpu.BlockSizes(block_n=bn, block_g=bg, k_splits=ks) for bn, bg, ks in
                      [(128, 16, 4), (256, 32, 2), (128, 32, 8), (64, 16, 8)])
        rows += bench([(4096, 14336)], [1], interpret=False, chain=16, n_sets=8, reps=5, log=say, sweep=sweep)
    say("")
    say("| K x N | rows | kernel us | XLA dequant+dot us | ratio | XLA LUT us | ratio | bf16 us | ratio |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        say(f"| {r['k']}x{r['n']} | {r['rows']} | {r['kernel_us']:.1f} | {r['xla_dequant_dot_us']:.1f} | "
            f"{r['kernel_vs_xla_dequant_dot']:.2f}x | {r['xla_lut_us']:.1f} | {r['kernel_vs_xla_lut']:.2f}x | "
            f"{r['bf16_dense_us']:.1f} | {r['kernel_vs_bf16']:.2f}x |")
    say(f"checks {'PASS' if ok else 'FAIL'}; {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "checks_ok": ok,
                       "rows": rows, "log": lines}, f, indent=1)
    return ok, rows


if __name__ == "__main__":
    main()
