"""GEMV kernel vs XLA's matmul at batch 1, per weight shape; `--tune` sweeps the block sizes.

    python -m kernels.gemv.bench                 # tuned/default blocks vs XLA, decode shapes
    python -m kernels.gemv.bench --tune --json $OUT/gemv_tune.json

Each measurement chains matvecs over enough distinct weight copies (>= 256 MB) that nothing is
served from the 50 MB L2, inside one jitted call, so the time includes the gaps between
kernels as a decode step sees them. Bandwidth = weight bytes / time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import math
import time

# fused decode layouts (q|k|v, o, gate|up, down) of the two benchmark models
SHAPES = {"llama-3.2-1b": [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)],
          "smollm2-135m": [(576, 960), (576, 576), (576, 3072), (1536, 576)]}


GRIDS = {  # (bk, bn, target_programs, num_warps)
    "full": ((128, 256, 512), (16, 32, 64), (132, 264, 528), (4, 8)),
    # 12 candidates a shape (a short device call); more programs in flight for HBM3e's bandwidth
    "narrow": ((128, 256), (32, 64), (264, 528, 1056), (4,)),
}


def _candidates(grid: str = "full"):
    from kernels.gemv.gpu import Blocks

    for bk, bn, tp, nw in itertools.product(*GRIDS[grid]):
        yield Blocks(bk=bk, bn=bn, target_programs=tp, num_warps=nw, num_stages=None)


def _chain(fn):
    import jax
    import jax.numpy as jnp

    def run(x, ws):
        acc = jnp.zeros((), jnp.float32)
        for w in ws:  # sequential: each kernel reads its own weight copy
            acc = acc + fn(x, w)[0, 0]
        return acc

    return jax.jit(run)


def _time(compiled, x, ws, reps: int) -> float:
    import jax

    jax.block_until_ready(compiled(x, ws))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = compiled(x, ws)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / (reps * len(ws)))
    return best


def bench_shape(k: int, n: int, tune: bool, reps: int = 10, interpret: bool = False, rows: int = 1,
                grid: str = "full") -> dict:
    import jax
    import jax.numpy as jnp

    from kernels.gemv import gpu

    nbytes = k * n * 2
    copies = 2 if interpret else min(64, max(2, -(-(256 << 20) // nbytes)))
    keys = jax.random.split(jax.random.key(k * 7 + n), copies + 1)
    ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys[1:]]
    x = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
    xla = _chain(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)).lower(x, ws).compile()
    row = {"k": k, "n": n, "rows": rows, "mb": nbytes / 1e6, "xla_us": _time(xla, x, ws, reps) * 1e6}
    current = gpu.blocks_for(k, n)
    cands = list(dict.fromkeys([current, gpu.Blocks(), *(_candidates(grid) if tune else [])]))
    if interpret:
        cands = cands[:3]

    def compile_one(b):
        try:
            return b, _chain(lambda x, w: gpu.matvec(x, w, blocks=b, interpret=interpret)).lower(x, ws).compile()
        except Exception as e:  # a block shape Triton rejects: skip it, say so
            return b, e

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(compile_one, cands))
    results = []
    for b, c in compiled:
        if isinstance(c, Exception):
            print(f"  {k}x{n} {b}: failed to compile: {str(c).splitlines()[0][:120]}")
            continue
        results.append((_time(c, x, ws, reps) * 1e6, b))
    results.sort(key=lambda r: r[0])
    cur_us = next(us for us, b in results if b == current)
    best_us, best = results[0]
    row.update(current_us=cur_us, best_us=best_us, best=dataclasses.asdict(best),
               current_tbps=nbytes / cur_us / 1e6, best_tbps=nbytes / best_us / 1e6, xla_tbps=nbytes / row["xla_us"] / 1e6,
               kernel_vs_xla=row["xla_us"] / cur_us, tuned_vs_xla=row["xla_us"] / best_us)
    return row


def _write_tuned(rows, info):
    """Each shape's best blocks into this device's table in tuned.json (the sweep re-measured the
    current entry in the same run); other devices' tables stay."""
    from kernels.gemv import gpu

    table = json.loads(gpu.TUNED_FILE.read_text()) if gpu.TUNED_FILE.exists() else {"devices": {}}
    entry = table["devices"].setdefault(info["device"], {"blocks": {}})
    for r in rows:
        key = f"{r['k']}x{r['n']}"
        entry["blocks"][key] = {**r["best"], "us": round(r["best_us"], 2)}
    entry.update(jax=info["jax"], date=info["date"], command="python -m kernels.gemv.bench --tune --write")
    gpu.TUNED_FILE.write_text(json.dumps(table, indent=1) + "\n")
    gpu.tuned.cache_clear()
    print(f"wrote {gpu.TUNED_FILE} ({info['device']})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.gemv.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.2-1b,smollm2-135m")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--grid", default="full", choices=sorted(GRIDS), help="--tune: the candidate blocks")
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true", help="--tune: keep each shape's best in kernels/gemv/tuned.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes in interpret mode (CPU check)")
    ap.add_argument("--rows", default="1", help="comma-separated M values (e.g. 1,5: a speculative verify pass)")
    args = ap.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows takes comma-separated integers, got {args.rows!r}")
    if any(not 1 <= r <= 8 for r in row_counts):
        ap.error(f"--rows must lie in 1..8 (the kernel's range), got {args.rows}")
    if args.write and row_counts != [1]:
        ap.error("--write keeps blocks tuned at one row; run --tune --write with --rows 1")
    import datetime

    import jax

    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {sorted(SHAPES)}")
    rows = []
    print(f"{'shape':>12} {'M':>2} {'MB':>6} {'XLA us':>8} {'kern us':>8} {'TB/s':>6} {'x XLA':>6}"
          + (f" {'tuned us':>9} {'TB/s':>6} {'x XLA':>6}  best blocks" if args.tune else ""), flush=True)
    for m in args.models.split(","):
        for (k, n), mr in itertools.product([(128, 256)] if args.dry_run else SHAPES[m], row_counts):
            r = bench_shape(k, n, args.tune, reps=1 if args.dry_run else 10, interpret=args.dry_run, rows=mr,
                            grid=args.grid)
            r["model"] = m
            rows.append(r)
            line = (f"{k:>5}x{n:<6} {mr:2d} {r['mb']:6.1f} {r['xla_us']:8.2f} {r['current_us']:8.2f} {r['current_tbps']:6.2f}"
                    f" {r['kernel_vs_xla']:6.2f}")
            if args.tune:
                line += f" {r['best_us']:9.2f} {r['best_tbps']:6.2f} {r['tuned_vs_xla']:6.2f}  {r['best']}"
            print(line, flush=True)
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat()}
    print(f"{info['device']}, jax {info['jax']}, {info['date']}; us per matvec, M rows, bf16 weights")
    if args.tune and args.write and not args.dry_run:
        _write_tuned(rows, info)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
