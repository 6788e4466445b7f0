"""GEMV kernel vs XLA's matmul at batch 1, per weight shape; `--tune` sweeps the block sizes.

    python -m kernels.gemv.bench                 # tuned/default blocks vs XLA, decode shapes
    python -m kernels.gemv.bench --tune --json $OUT/gemv_tune.json
    python -m kernels.gemv.bench --tune --grid wide --weights bf16,t,i8 --models llama-3.2-1b --write

--weights picks the kernel: bf16 (`matvec`), t (the tied head, `matvec_t`), i8 (int8 codes, the w8 and
+emb8 route), u4g128 (`quant.matvec_q4`); --write keeps each shape's best blocks per device and format
in tuned.json, after every shape.

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
VOCAB = {"llama-3.2-1b": 128256, "smollm2-135m": 49152}


GRIDS = {  # (bk, bn, target_programs, num_warps[, prefetch[, fixup]])
    "full": ((128, 256, 512), (16, 32, 64), (132, 264, 528), (4, 8)),
    # 12 candidates a shape (a short device call); more programs in flight for HBM3e's bandwidth
    "narrow": ((128, 256), (32, 64), (264, 528, 1056), (4,)),
    # quantized weights: byte tiles are narrower than bf16 ones, so wider columns and more programs
    "quant": ((64, 128), (128, 256), (1056,), (4, 8)),
    # wide tiles, many warps: what won the MoE expert GEMV sweep on an H200 (64x128, 16 warps: 1.7x the
    # 128x64 / 4-warp tile the bf16 table holds; docs/moe.md), never tried for the dense GEMV
    "wide": ((32, 64, 128), (128, 256), (1056, 2112), (8, 16)),
    # the next tile's load issued before this tile's arithmetic (Blocks.prefetch), around the tuned tiles
    "prefetch": ((64, 128), (64, 128, 256), (528, 1056), (4, 8), (True,)),
    # K splits summed in the kernel (Blocks.fixup): without a partial-sum kernel after it, more splits may pay
    "fixup": ((64, 128, 256), (64, 128), (528, 1056, 2112), (4, 8), (False,), (True,)),
}
# --weights: the format's table key and the decode shapes it serves (+ the tied lm_head for i8: emb8)
WEIGHT_FORMATS = ("bf16", "i8", "u4g128", "t")


def _candidates(grid: str = "full"):
    from kernels.gemv.gpu import Blocks

    grid = (*GRIDS[grid], (False,), (False,))[:6]
    for bk, bn, tp, nw, pf, fx in itertools.product(*grid):
        yield Blocks(bk=bk, bn=bn, target_programs=tp, num_warps=nw, num_stages=None, prefetch=pf, fixup=fx)


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


def _weights(fmt: str, k: int, n: int, key):
    """(the kernel's operands for one weight copy, bytes it reads, fn(x, w, blocks, interpret) -> the product
    as the decode step takes it: bf16, fp32 for the tied head's logits)."""
    import jax
    import jax.numpy as jnp

    from kernels.gemv import gpu, quant

    if fmt == "bf16":
        return (jax.random.normal(key, (k, n), jnp.bfloat16), k * n * 2,
                lambda x, w, b, i: gpu.matvec(x, w, blocks=b, interpret=i, out_dtype=x.dtype))
    if fmt == "t":  # a tied head [V, D] read transposed: bn vocab rows per program, bk features per step
        return (jax.random.normal(key, (n, k), jnp.bfloat16), k * n * 2,
                lambda x, w, b, i: gpu.matvec_t(x, w, bv=b.bn, bd=b.bk, num_warps=b.num_warps, interpret=i))
    if fmt == "i8":  # codes and a scale per column, as qmatmul's gemv route runs them
        w = (jax.random.randint(key, (k, n), -127, 128, jnp.int32).astype(jnp.int8), jnp.ones((n,), jnp.bfloat16))
        return w, k * n + n * 2, lambda x, w, b, i: gpu.matvec(x, w[0], blocks=b, interpret=i, out_scale=w[1],
                                                               out_dtype=x.dtype)
    group = int(fmt[len("u4g"):])  # asymmetric groups of `group` rows: the w4g128 recipes
    w = (jax.random.randint(key, (k, n // 2), 0, 256, jnp.int32).astype(jnp.uint8),
         jnp.ones((k // group, n), jnp.bfloat16), jnp.zeros((k // group, n), jnp.bfloat16))
    return w, k * n // 2 + 2 * (k // group) * n * 2, \
        lambda x, w, b, i: quant.matvec_q4(x, w[0], w[1], w[2], n=n, blocks=b, interpret=i, out_dtype=x.dtype)


def bench_shape(k: int, n: int, tune: bool, reps: int = 10, interpret: bool = False, rows: int = 1,
                grid: str = "full", fmt: str = "bf16") -> dict:
    import jax
    import jax.numpy as jnp

    from kernels.gemv import gpu

    keys = jax.random.split(jax.random.key(k * 7 + n), 66)
    _, nbytes, fn = _weights(fmt, k, n, keys[1])
    copies = 2 if interpret else min(64, max(2, -(-(256 << 20) // nbytes)))
    ws = [_weights(fmt, k, n, kk)[0] for kk in keys[1:copies + 1]]
    x = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
    # the baseline is XLA's bf16 dot on a bf16 weight of the same shape: "x XLA" is the speed-up over bf16
    wb = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys[1:max(2, min(64, -(-(256 << 20) // (k * n * 2)))) + 1]]
    xla = _chain(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)).lower(x, wb).compile()
    row = {"k": k, "n": n, "rows": rows, "weights": fmt, "mb": nbytes / 1e6, "xla_us": _time(xla, x, wb, reps) * 1e6}
    del wb
    current = gpu.blocks_for(k, n, fmt)
    # integer codes: the current blocks also with the plain conversion instruction, the A/B of gpu.int_to_f32;
    # and (matvec: bf16, i8) the current blocks with the other prefetch setting
    plain = dataclasses.replace(current, convert="cvt" if current.convert == "magic" else "magic")
    flipped = dataclasses.replace(current, prefetch=not current.prefetch)
    # and (every format but the tied head's) the current blocks with the other K-split sum (Blocks.fixup)
    fixed = dataclasses.replace(current, fixup=not current.fixup)
    integer = fmt == "i8" or fmt.startswith("u4")
    cands = list(dict.fromkeys([current, gpu.Blocks(), *([plain] if integer else []),
                                *([flipped] if fmt in ("bf16", "i8") else []), *([fixed] if fmt != "t" else []),
                                *(_candidates(grid) if tune else [])]))
    if fmt == "t":  # matvec_t has one program per bn vocab rows: target_programs does not apply
        cands = list(dict.fromkeys(dataclasses.replace(b, target_programs=gpu.Blocks().target_programs) for b in cands))
        current = dataclasses.replace(current, target_programs=gpu.Blocks().target_programs)
    if interpret:
        cands = cands[:5]

    def compile_one(b):
        try:
            return b, _chain(lambda x, w: fn(x, w, b, interpret)).lower(x, ws).compile()
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
    if integer:
        row[f"{plain.convert}_us"] = next((us for us, b in results if b == plain), None)
    if fmt in ("bf16", "i8"):
        row[f"prefetch_{flipped.prefetch}_us"] = next((us for us, b in results if b == flipped), None)
    if fmt != "t":
        row[f"fixup_{fixed.fixup}_us"] = next((us for us, b in results if b == fixed), None)
    best_us, best = results[0]
    row.update(current_us=cur_us, best_us=best_us, best=dataclasses.asdict(best),
               current_tbps=nbytes / cur_us / 1e6, best_tbps=nbytes / best_us / 1e6, xla_tbps=k * n * 2 / row["xla_us"] / 1e6,
               kernel_vs_xla=row["xla_us"] / cur_us, tuned_vs_xla=row["xla_us"] / best_us)
    return row


def _write_tuned(rows, info):
    """Each shape's best blocks into this device's table in tuned.json (the sweep re-measured the
    current entry in the same run); other devices' tables stay."""
    from kernels.gemv import gpu

    table = json.loads(gpu.TUNED_FILE.read_text()) if gpu.TUNED_FILE.exists() else {"devices": {}}
    entry = table["devices"].setdefault(info["device"], {"blocks": {}})
    for r in rows:
        key = f"{r['k']}x{r['n']}" if r.get("weights", "bf16") == "bf16" else f"{r['weights']}:{r['k']}x{r['n']}"
        entry["blocks"][key] = {**r["best"], "us": round(r["best_us"], 2)}
    entry.update(jax=info["jax"], date=info["date"], command="python -m kernels.gemv.bench --tune --write")
    gpu.TUNED_FILE.write_text(json.dumps(table, indent=1) + "\n")
    gpu.tuned.cache_clear()
    print(f"wrote {gpu.TUNED_FILE} ({info['device']})")


def _info() -> dict:
    import datetime

    import jax

    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat()}


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
    ap.add_argument("--weights", default="bf16", help=f"comma-separated weight formats, of {WEIGHT_FORMATS}: "
                    "i8 = int8 codes with a scale per column (w8 recipes, +emb8), u4g128 = the 4-bit kernel, groups of 128, "
                    "t = the tied bf16 head read transposed (matvec_t; tiles: bn vocab rows, bk features)")
    args = ap.parse_args(argv)
    fmts = [f for f in args.weights.split(",") if f]
    if any(f not in WEIGHT_FORMATS for f in fmts):
        ap.error(f"--weights: unknown format in {args.weights!r}; known: {WEIGHT_FORMATS}")
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows takes comma-separated integers, got {args.rows!r}")
    if any(not 1 <= r <= 8 for r in row_counts):
        ap.error(f"--rows must lie in 1..8 (the kernel's range), got {args.rows}")
    if args.write and row_counts != [1]:
        ap.error("--write keeps blocks tuned at one row; run --tune --write with --rows 1")
    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {sorted(SHAPES)}")
    rows = []
    print(f"{'shape':>12} {'fmt':>6} {'M':>2} {'MB':>6} {'XLA us':>8} {'kern us':>8} {'TB/s':>6} {'x XLA':>6}"
          + (f" {'tuned us':>9} {'TB/s':>6} {'x XLA':>6}  best blocks" if args.tune else ""), flush=True)
    for m, fmt in itertools.product(args.models.split(","), fmts):
        # i8: + the int8 head of +emb8; t: only the tied head (bf16, read transposed)
        shapes = [(SHAPES[m][0][0], VOCAB[m])] if fmt == "t" else SHAPES[m] + (
            [(SHAPES[m][0][0], VOCAB[m])] if fmt == "i8" else [])
        for (k, n), mr in itertools.product([(128, 256)] if args.dry_run else shapes, row_counts):
            r = bench_shape(k, n, args.tune, reps=1 if args.dry_run else 10, interpret=args.dry_run, rows=mr,
                            grid=args.grid, fmt=fmt)
            r["model"] = m
            rows.append(r)
            line = (f"{k:>5}x{n:<6} {fmt:>6} {mr:2d} {r['mb']:6.1f} {r['xla_us']:8.2f} {r['current_us']:8.2f} {r['current_tbps']:6.2f}"
                    f" {r['kernel_vs_xla']:6.2f}")
            for var in ("cvt", "magic", "prefetch_True", "prefetch_False", "fixup_True", "fixup_False"):  # one setting flipped
                if r.get(f"{var}_us"):
                    line += f"  ({var}: {r[f'{var}_us']:.2f} us)"

            if args.tune:
                line += f" {r['best_us']:9.2f} {r['best_tbps']:6.2f} {r['tuned_vs_xla']:6.2f}  {r['best']}"
            print(line, flush=True)
            if args.tune and args.write and not args.dry_run:  # after every shape: a timeout loses one shape only
                _write_tuned([r], _info())
    info = _info()
    print(f"{info['device']}, jax {info['jax']}, {info['date']}; us per matvec, M rows, {args.weights} weights "
          "(x XLA: against XLA's dot on bf16 weights of the same shape)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
