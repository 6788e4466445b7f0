"""Selective-scan benchmark: our Pallas kernel vs XLA (chunked associative_scan, one
associative_scan, sequential lax.scan), forward and forward+backward, against the HBM floor.

    python -m kernels.ssm_scan.bench                      # B8 L4096 D1536 N16 fp32 (Mamba-130m's mixer)
    python -m kernels.ssm_scan.bench --out bench.json --configs 32x8,32x8p,32x8ps4,64x8b

A config is block_p x chunk, then flags: b (batch_stores), p (prefetch), t (tile), c (parallel: the
chunk scanned along time with Triton's scan), o (with c: the session-11 state carry, GpuBlocks.carry_in
off), n (with c: GpuBlocks.split_n, tiles [T, N_r, P_w, N_l, P_l]), kN (backward chunk), jN (backward
channels per program), sN (N segments; none: 1), uN (with n: chunks per loop iteration), wN (warps); or
`auto` (the default, `gpu.default_blocks`: the chunk-parallel 32x16pcnk8j32u2w4 where it applies) or
`sequential` (the default before 2026-12-05, `GpuBlocks()`: segments and prefetch chosen per shape); see
kernels.ssm_scan.gpu.GpuBlocks. Every config is timed forward, then the XLA alternatives; the fastest config
is then timed forward + backward and checked against the reference.

The floor is the bytes a forward must move (read x, Δ, B, C and write y once) over the copy
bandwidth measured in the same run (x + 1 over a 1 GiB buffer: bytes read + written).
Timings: `reps` back-to-back calls between two device syncs, median of `groups` such runs.
On the GPU the run also checks our kernel (y and all gradients) against the lax.scan
reference at the benchmark shape, and in the multi-head layout at a length that is not a
multiple of the chunk with N=64 and bf16 inputs.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.ssm_scan import GpuBlocks, selective_scan
from kernels.ssm_scan.gpu import default_blocks, hbm_bytes


def timeit(fn, *args, reps: int = 10, groups: int = 3, min_group_s: float = 0.05) -> float:
    """Median seconds per call over `groups` runs of back-to-back calls, each run at least `reps` calls and
    `min_group_s` long: a ~0.5 ms kernel timed in runs of 5 calls (2.5 ms) moved by up to 23% with the GPU's
    clocks and launch latency (H100, 2026-12-05: one config 0.455-0.560 ms in one process)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    reps = max(reps, min(10_000, math.ceil(min_group_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(groups):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, warmup_s: float = 2.0) -> float:
    """Bytes/s of an elementwise pass (read + write) over a large fp32 buffer, after `warmup_s` of the same
    pass, so that the GPU's clocks have risen before the first row is timed (the first row of a run was up to
    23% slower than the same kernel timed later, H100 2026-12-05)."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        jax.block_until_ready(f(x))
    return 2 * nbytes / timeit(f, x, reps=20)


def make_inputs(bt, l, d, n, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (bt, l, d), jnp.float32).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (bt, l, d), jnp.float32) - 2.0).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(k[2], (d, n), jnp.float32))
    B = jax.random.normal(k[3], (bt, l, n), jnp.float32).astype(dtype)
    C = jax.random.normal(k[4], (bt, l, n), jnp.float32).astype(dtype)
    D = jax.random.normal(k[5], (d,), jnp.float32)
    return x, dt, A, B, C, D


@functools.lru_cache(maxsize=None)
def fns(impl: str, blocks=None, interpret: bool = False):
    """(forward, forward+backward) jitted; the backward is the VJP of a fixed cotangent."""
    def fwd(*a):
        return selective_scan(*a, impl=impl, blocks=blocks, interpret=interpret)

    def fwd_bwd(ct, *a):
        y, vjp = jax.vjp(fwd, *a)
        return y, vjp(ct)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def parse_config(text: str, n: int) -> GpuBlocks:
    """'32x8ps4' -> GpuBlocks(block_p=32, chunk=8, prefetch=True, segments=4); 'wN' sets num_warps."""
    if text == "auto":  # the default (kernels/ssm_scan/gpu.py default_blocks)
        return default_blocks(n)
    if text == "sequential":  # the default before 2026-12-05: 8 segments, scalar state
        return GpuBlocks()
    m = re.fullmatch(r"(\d+)x(\d+)(b?)(p?)(t?)(c?)(o?)(n?)(?:k(\d+))?(?:j(\d+))?(?:s(\d+))?(?:u(\d+))?(?:w(\d+))?", text)
    if not m:
        raise SystemExit(f"bad --configs entry {text!r}: want block_p x chunk [b][p][t][c][o][n][kN][jN][sN][uN][wN], e.g. "
                         "32x8ps4, 32x8tw4, 16x8c or 16x16ck8j32 (backward chunk 8, 32 channels per backward program)")
    bp, ch = int(m[1]), int(m[2])
    warps = int(m[13] or 0)
    if warps & (warps - 1):
        raise SystemExit(f"bad --configs entry {text!r}: num_warps (w{warps}) must be a power of 2")
    return GpuBlocks(block_p=bp, chunk=ch, max_state_regs=max(128, ch * n), batch_stores=bool(m[3]),
                     prefetch=bool(m[4]), tile=bool(m[5]), parallel=bool(m[6]), carry_in=not m[7],
                     split_n=bool(m[8]), bwd_chunk=int(m[9] or 0), bwd_block_p=int(m[10] or 0),
                     segments=int(m[11] or 1), unroll=int(m[12] or 1), num_warps=warps)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(1e-30, np.abs(want).max()))


def check_case(name, args, impl, blocks, tol, interpret=False):
    """Our kernel's y and gradients vs the lax.scan reference on this device."""
    ct = jax.random.normal(jax.random.key(9), args[0].shape, jnp.float32).astype(args[0].dtype)
    _, ours = fns(impl, blocks, interpret)
    _, ref = fns("reference")
    (y, g), (yr, gr) = ours(ct, *args), ref(ct, *args)
    errs = {"y": rel_err(y, yr), **{f"d{k}": rel_err(a, b) for k, a, b in zip(("x", "dt", "A", "B", "C", "D"), g, gr)}}
    worst = max(errs.values())
    ok = bool(np.isfinite(worst) and worst <= tol)
    print(f"check {name}: max rel err {worst:.2e} (tol {tol:.0e}) {'OK' if ok else 'FAIL'} "
          + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return {"case": name, "ok": ok, "tol": tol, "errors": errs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--configs", default="auto,32x8,32x8ps8,32x8s16,32x8ps16,32x8ps32",
                    help="Pallas GPU blocks, comma separated: block_p x chunk [b][p][t][sN][wN], or auto (see the "
                    "docstring)")
    ap.add_argument("--alternatives", default="xla,associative,reference")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-multihead-check", action="store_true",
                    help="check at the bench shape only (the multi-head check compiles for minutes on a GPU)")
    ap.add_argument("--bwd", default="", help="configs whose forward + backward is timed too (the fastest "
                    "forward's always is), e.g. auto: the default beside the best")
    ap.add_argument("--copy-bytes", type=int, default=1 << 30)
    ap.add_argument("--interpret", action="store_true", help="run the Pallas GPU kernel in interpret mode (CPU dry run)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    dtype = jnp.float32 if args.dtype == "fp32" else jnp.bfloat16
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu" or args.interpret
    report = {"device": getattr(dev, "device_kind", dev.platform), "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "shape": dict(B=args.batch, L=args.length, D=args.dim, N=args.state),
              "dtype": args.dtype, "rows": [], "checks": []}
    bt, l, d, n = args.batch, args.length, args.dim, args.state
    bw = copy_bandwidth(args.copy_bytes)
    floor = hbm_bytes(bt, l, d, n, jnp.dtype(dtype).itemsize) / bw
    report.update(copy_bandwidth_GBps=bw / 1e9, floor_ms=floor * 1e3)
    print(f"{report['device']}  copy bandwidth {bw / 1e9:.0f} GB/s  floor {floor * 1e3:.3f} ms", flush=True)

    inputs = make_inputs(bt, l, d, n, dtype)
    ct = jax.random.normal(jax.random.key(9), inputs[0].shape, jnp.float32).astype(dtype)
    configs = []
    if on_gpu:
        for c in args.configs.split(","):
            configs.append((f"pallas {c}", "pallas_gpu", parse_config(c, n)))
    alternatives = [(impl, impl, None) for impl in args.alternatives.split(",") if impl]
    def save():  # after every row, so a run cut short still leaves its numbers
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    # every kernel config forward (cheap compiles), XLA, then the fastest config's backward (a slow compile) and check
    def run_row(name, impl, blocks, with_bwd):
        row = {"impl": name}
        fwd, fwd_bwd = fns(impl, blocks, args.interpret and impl == "pallas_gpu")
        slow = impl == "reference"
        timed = [("fwd_ms", fwd, inputs)] + ([("fwd_bwd_ms", fwd_bwd, (ct, *inputs))] if with_bwd else [])
        for key, fn, a in timed:
            try:
                t0 = time.perf_counter()
                row[key] = timeit(fn, *a, reps=2 if slow else args.reps, groups=2 if slow else 3) * 1e3
                row[key.replace("ms", "wall_s")] = time.perf_counter() - t0
            except Exception as e:  # an OOM of one alternative must not lose the others
                row[key] = None
                row[key.replace("ms", "error")] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        return row

    with_bwd = {f"pallas {c}" for c in args.bwd.split(",") if c}
    unknown = with_bwd - {name for name, _, _ in configs}
    if on_gpu and unknown:
        raise SystemExit(f"--bwd {args.bwd!r}: {sorted(b[len('pallas '):] for b in unknown)} not among "
                         f"--configs {args.configs!r}")
    for name, impl, blocks in configs:
        report["rows"].append(run_row(name, impl, blocks, with_bwd=name in with_bwd))
        save()
    for name, impl, blocks in alternatives:
        report["rows"].append(run_row(name, impl, blocks, with_bwd=True))
        save()
    timed_ok = [(r, c) for r, c in zip(report["rows"], configs) if r.get("fwd_ms")]
    if timed_ok:
        best_row, (name, impl, blocks) = min(timed_ok, key=lambda rc: rc[0]["fwd_ms"])
        if not best_row.get("fwd_bwd_ms"):
            best_row.update(run_row(name, impl, blocks, with_bwd=True))
            save()
        if not args.no_check:
            tol = 1e-4 if dtype == jnp.float32 else 2e-2
            report["checks"].append(check_case(f"bench shape {args.dtype}, {name}", inputs, "pallas_gpu", blocks,
                                               tol, args.interpret))
            save()
        configs = [(name, impl, blocks)]  # the multi-head check below uses it
    if configs and not args.no_check and not args.no_multihead_check:
        # last (a new compile of both kernels): multi-head layout, L not a multiple of the chunk, N=64, bf16
        k = jax.random.split(jax.random.key(2), 6)
        mh = (jax.random.normal(k[0], (2, 77, 4, 32)).astype(jnp.bfloat16),
              jax.nn.softplus(jax.random.normal(k[1], (2, 77, 4)) - 1.0).astype(jnp.bfloat16),
              -jnp.exp(jax.random.normal(k[2], (4,))),
              jax.random.normal(k[3], (2, 77, 2, 64)).astype(jnp.bfloat16),
              jax.random.normal(k[4], (2, 77, 2, 64)).astype(jnp.bfloat16), jax.random.normal(k[5], (4,)))
        report["checks"].append(check_case("multi-head L77 H4 P32 G2 N64 bf16", mh, "pallas_gpu", configs[0][2],
                                           2e-2, args.interpret))
        save()

    ok_rows = [r for r in report["rows"] if r.get("fwd_ms")]
    ours = [r for r in ok_rows if r["impl"].startswith("pallas")]
    alts = [r for r in ok_rows if not r["impl"].startswith("pallas")]
    best_alt_f = min((r["fwd_ms"] for r in alts), default=None)
    best_alt_fb = min((r["fwd_bwd_ms"] for r in alts if r.get("fwd_bwd_ms")), default=None)
    print(f"\nselective scan B{bt} L{l} D{d} N{n} {args.dtype} on {report['device']} ({report['date']}, jax {jax.__version__})")
    print(f"HBM floor {floor * 1e3:.3f} ms (copy bandwidth {bw / 1e9:.0f} GB/s)")
    print(f"{'impl':<16}{'fwd ms':>10}{'% floor':>9}{'fwd+bwd ms':>12}{'fwd vs best XLA':>17}{'f+b vs best XLA':>17}")
    for r in report["rows"]:
        f, fb = r.get("fwd_ms"), r.get("fwd_bwd_ms")
        cells = [f"{f:10.3f}" if f else f"{'-':>10}", f"{100 * floor * 1e3 / f:8.1f}%" if f else f"{'-':>9}",
                 f"{fb:12.3f}" if fb else f"{'-':>12}",
                 f"{best_alt_f / f:16.1f}x" if (f and best_alt_f) else f"{'':>17}",
                 f"{best_alt_fb / fb:16.1f}x" if (fb and best_alt_fb) else f"{'':>17}"]
        print(f"{r['impl']:<16}" + "".join(cells))
    if ours:
        best = min(ours, key=lambda r: r["fwd_ms"])
        report["best_pallas"] = best["impl"]
        report["best_pallas_pct_of_floor"] = 100 * floor * 1e3 / best["fwd_ms"]
    for c in report["checks"]:
        print(f"check {c['case']}: {'OK' if c['ok'] else 'FAIL'} (max rel err {max(c['errors'].values()):.1e})")
    save()
    return report


if __name__ == "__main__":
    main()
