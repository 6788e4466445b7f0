"""Mixtral MoE layer speed on one GPU, every figure from the same run.

    python -m eval.bench_moe [--tokens 4096 --dim 4096 --ffn 14336 --experts 8 --top-k 2] [--out moe.json]

2. MoE layer forward (router, sort, 3 grouped matmuls, unsort, combine) at --tokens tokens:
   expert FLOPs / time, as a fraction of a dense bf16 matmul measured in the same run, for our
   Pallas kernel and XLA's ragged_dot (tokamax's kernels in 5, when installed)
3. batch 1 (decoding): the MoE layer vs a dense SwiGLU of width top_k * ffn (same bytes of weights),
   through the expert GEMV (the default there, then other block sizes), the grouped matmul,
   XLA's ragged_dot and gathered experts; with --profile, the default's kernels per call under jax.profiler
4. our kernel vs ragged_dot on the device (outputs; gradients in bf16)
5. tokamax / JAX's Mosaic GPU example in the layer, more block sizes, and the grouped matmul
   alone (8 groups of N=ffn; 64 groups of N=ffn/8)
--sweep (first, after the dense reference): the layer with each of SWEEP_BLOCKS, and the batch-1 layer
   with each of SWEEP_DECODE: the block sizes to make the defaults in kernels/grouped_matmul/gpu.py
A time budget (--budget seconds) skips what is left once spent; the table prints regardless.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp

from eval.common import device_info, write_json
from flashit_jax.errors import FlashitError, user_errors
from kernels.gemv import experts as gemv_experts
from kernels.gemv.gpu import Blocks as GemvBlocks
from kernels.grouped_matmul import bench as gbench
from kernels.grouped_matmul import gpu
from kernels.grouped_matmul.common import BlockSizes
from models import mixtral
from models.mixtral import MixtralConfig


def _layer_params(c: MixtralConfig, dtype, key):
    ks = jax.random.split(key, 4)
    d, f, e = c.dim, c.ffn_dim, c.n_experts

    def w(k, shape, fan_in):
        return (jax.random.normal(k, shape, dtype) * (fan_in ** -0.5)).astype(dtype)

    return {"router": {"w": w(ks[0], (d, e), d)},
            "experts": {"gate": {"w": w(ks[1], (e, d, f), d)}, "up": {"w": w(ks[2], (e, d, f), d)},
                        "down": {"w": w(ks[3], (e, f, d), f)}}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--sweep", action="store_true", help="time more block sizes first (see the docstring)")
    ap.add_argument("--sections", default="2,3,4,5", help="comma-separated sections of the list above to run")
    ap.add_argument("--gemv-sweep", action="store_true", help="section 3: more expert-GEMV block sizes")
    ap.add_argument("--profile", action="store_true",
                    help="after section 3: the batch-1 layer's kernels under jax.profiler (eval.profile_decode)")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"2", "3", "4", "5"}
    if unknown:
        ap.error(f"--sections: unknown section(s) {sorted(unknown)}; the sections are 2, 3, 4 and 5")
    with user_errors("eval.bench_moe"):
        run(args)


def run(args):
    t_start = time.perf_counter()
    if jax.default_backend() != "gpu":
        raise FlashitError("eval.bench_moe times GPU kernels; no GPU is visible to jax "
                           f"(backend {jax.default_backend()!r})")
    dtype = jnp.dtype(args.dtype)
    c = MixtralConfig(vocab_size=32000, dim=args.dim, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim=args.ffn,
                      n_experts=args.experts, top_k=args.top_k)
    report = {**device_info(), "config": vars(args), "rows": []}
    rows = report["rows"]

    def log(row):
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write_json(args.out, report)

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    print(report["device"], report["jax_version"], report["date"], flush=True)
    try:
        _sections(args, c, dtype, log, left)
    finally:
        print_table(report)
        print(f"total {time.perf_counter() - t_start:.1f} s", flush=True)


def _sections(args, c, dtype, log, left):
    # 2. the MoE layer at --tokens tokens
    key = jax.random.key(0)
    p = _layer_params(c, dtype, key)
    x = jax.random.normal(jax.random.fold_in(key, 9), (1, args.tokens, args.dim), dtype)
    rows_k = args.tokens * c.top_k
    flops = 2 * rows_k * 3 * c.dim * c.ffn_dim
    a = jax.random.normal(key, (rows_k, c.dim), dtype)
    sections = set(args.sections.split(","))
    dense = gbench.time_fn(jax.jit(lambda a, w: a @ w), a, p["experts"]["gate"]["w"][0])
    dense_rate = 2 * rows_k * c.dim * c.ffn_dim / dense
    case = f"MoE layer T{args.tokens} d{c.dim} ffn{c.ffn_dim} E{c.n_experts} top{c.top_k}"
    log({"case": case, "impl": f"dense matmul [{rows_k}x{c.dim}]@[{c.dim}x{c.ffn_dim}]", "ms": dense * 1e3,
         "tflops": dense_rate / 1e12, "frac": 1.0})
    configs = list(gbench.CONFIGS.items())
    layer = functools.partial(_layer, case, c=c, p=p, x=x, flops=flops, dense_rate=dense_rate, log=log, left=left)
    if args.sweep:
        _sweep(c, p, x, dtype, layer, log, left)
    if "2" in sections:
        layer({f"ours {configs[0][0]}": functools.partial(gpu.gmm, block_sizes=configs[0][1]),
               "xla ragged_dot": lambda a, b, g: jax.lax.ragged_dot(a, b, g)})

    # 3. batch 1: the chosen experts only, against a dense SwiGLU of width top_k * ffn
    if left() > 0 and "3" in sections:
        case1 = f"batch-1 MoE layer vs dense SwiGLU of width {c.top_k}x{c.ffn_dim}"
        x1 = x[:, :1]
        wide = c.top_k * c.ffn_dim
        dw = {n: jax.random.normal(jax.random.fold_in(key, i), s, dtype) * 0.01
              for i, (n, s) in enumerate((("gate", (c.dim, wide)), ("up", (c.dim, wide)), ("down", (wide, c.dim))))}
        swiglu = jax.jit(lambda w, x: (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"])
        t_dense = gbench.time_fn(swiglu, dw, x1, calls=50)
        weight_bytes = 3 * c.dim * wide * dtype.itemsize
        log({"case": case1, "impl": "dense SwiGLU", "ms": t_dense * 1e3, "GB/s": weight_bytes / t_dense / 1e9})
        # the fp32 layer through XLA's gathered experts: what every batch-1 path must compute
        p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        y1_ref = mixtral.moe_layer(p32, x1.astype(jnp.float32), c, impl="xla", dispatch=False, gemv=False)[0]
        gemv_rows = [(f"MoE, ours expert GEMV {_gemv_label(b)}", dict(impl="triton", gemv=b))
                     for b in EXPERT_GEMV_BLOCKS + (EXPERT_GEMV_SWEEP if args.gemv_sweep else [])]
        for name, kw in (*gemv_rows, ("MoE, gathered experts", dict(dispatch=False, gemv=False)),
                         ("MoE, ours grouped", dict(dispatch=True, impl="triton", gemv=False)),
                         ("MoE, xla ragged_dot", dict(dispatch=True, impl="xla"))):
            try:
                f = jax.jit(lambda p, x, kw=kw: mixtral.moe_layer(p, x, c, **kw)[0])
                t = gbench.time_fn(f, p, x1, calls=50)
                log({"case": case1, "impl": name, "ms": t * 1e3, "GB/s": weight_bytes / t / 1e9,
                     "vs_dense": t / t_dense, "rel_err_vs_fp32": gbench.rel(f(p, x1), y1_ref)})
            except Exception as e:
                log({"case": case1, "impl": name, "error": f"{type(e).__name__}: {e}"[:400]})
        if args.profile:
            _profile_batch1(c, p, x1, log)

    # 4. correctness on the device (fp32: exact products, so only the summation order differs)
    for dt, grads in ((jnp.bfloat16, True), (jnp.float32, False)) if "4" in sections else ():
        if left() < 0:
            break
        try:
            log({"case": "check vs ragged_dot", **gbench.check_against_ragged_dot(dt, grads=grads)})
        except Exception as e:
            log({"case": "check vs ragged_dot", "dtype": jnp.dtype(dt).name, "error": f"{type(e).__name__}: {e}"[:400]})

    # 5. the alternatives (tokamax, JAX's Mosaic GPU example), more block sizes, the grouped matmul alone
    if "5" not in sections:
        return
    others = {k: v for k, v in gbench.alternatives().items() if k != "xla ragged_dot"} if left() > 0 else {}
    if left() > 0:
        layer({**others, **{f"ours {n}": functools.partial(gpu.gmm, block_sizes=bs) for n, bs in configs[1:]}})
    others["xla ragged_dot"] = lambda a, b, g: jax.lax.ragged_dot(a, b, g)
    for m, k, n, g, cfgs in ((rows_k, c.dim, c.ffn_dim, c.n_experts, gbench.CONFIGS),
                             (rows_k, c.dim, c.ffn_dim // 8, 8 * c.n_experts, dict(configs[:1]))):
        if left() < 0:
            break
        try:
            for r in gbench.bench_gmm(m, k, n, g, dtype, configs=cfgs, others=others, log=lambda r: None):
                log(r)
        except Exception as e:
            log({"case": f"gmm M{m} K{k} N{n} G{g}", "error": f"{type(e).__name__}: {e}"[:400]})


# Triton on Hopper: tl.dot lowers to wgmma; these are the usual candidates for bf16 (smem per stage
# = (bm + bn) * bk * 2 bytes; 4 stages of 128x256x64 use 196 KB of the 227 KB)
SWEEP_BLOCKS = [BlockSizes(128, 128, 64, num_warps=4, num_stages=3), BlockSizes(128, 256, 64, num_warps=8, num_stages=3),
                BlockSizes(256, 128, 64, num_warps=8, num_stages=3), BlockSizes(128, 256, 64, num_warps=8, num_stages=4),
                BlockSizes(128, 128, 64, num_warps=8, num_stages=4), BlockSizes(128, 128, 128, num_warps=8, num_stages=3),
                BlockSizes(128, 256, 64, num_warps=8, num_stages=3, group_m=16)]
# batch 1: memory-bound; more, narrower column tiles give more programs streaming weights
SWEEP_DECODE = [BlockSizes(16, 64, 128, num_warps=4, num_stages=4), BlockSizes(16, 32, 128, num_warps=4, num_stages=4),
                BlockSizes(16, 32, 256, num_warps=4, num_stages=4), BlockSizes(16, 64, 256, num_warps=4, num_stages=3),
                BlockSizes(16, 128, 128, num_warps=4, num_stages=4), BlockSizes(16, 32, 512, num_warps=4, num_stages=3),
                BlockSizes(16, 16, 512, num_warps=2, num_stages=4), BlockSizes(16, 64, 128, num_warps=2, num_stages=6)]


# batch 1 through the expert GEMV (kernels/gemv/experts.py): the default first
EXPERT_GEMV_BLOCKS = [gemv_experts.DEFAULT_BLOCKS, GemvBlocks(bk=128, bn=64, target_programs=528),
                      GemvBlocks(bk=128, bn=128, target_programs=1056), GemvBlocks(bk=256, bn=64, target_programs=1056),
                      GemvBlocks(bk=128, bn=64, target_programs=2112), GemvBlocks(bk=64, bn=128, target_programs=1056, num_warps=8)]


# wider column tiles and 8 warps led on an H200 (2026-12-04: 64x128/p1056w8 0.250 ms, 128x64/p1056w4 0.341)
EXPERT_GEMV_SWEEP = [GemvBlocks(bk=bk, bn=bn, target_programs=tp, num_warps=nw, num_stages=st)
                     for bk, bn, tp, nw, st in ((64, 128, 2112, 8, None), (64, 256, 1056, 8, None), (32, 256, 1056, 8, None),
                                                (64, 256, 2112, 8, None), (128, 128, 1056, 8, None), (128, 256, 1056, 8, None),
                                                (64, 128, 1056, 8, 4), (64, 128, 4224, 8, None), (32, 128, 2112, 4, None),
                                                (64, 512, 1056, 8, None), (128, 128, 2112, 8, None), (64, 128, 1056, 16, None))]


def _gemv_label(b: GemvBlocks) -> str:
    return f"{b.bk}x{b.bn}/p{b.target_programs}w{b.num_warps}" + (f"s{b.num_stages}" if b.num_stages else "")


def _label(bs: BlockSizes) -> str:
    """'128x256x64/w8s3' (and '/g16' for a swizzle band other than the default 8)."""
    g = f"/g{bs.group_m}" if bs.group_m != BlockSizes().group_m else ""
    return f"{bs.block_m}x{bs.block_n}x{bs.block_k}/w{bs.num_warps}s{bs.num_stages}{g}"


def _sweep(c, p, x, dtype, layer, log, left):
    layer({f"ours {_label(bs)}": functools.partial(gpu.gmm, block_sizes=bs) for bs in SWEEP_BLOCKS})
    # batch 1: decode blocks timed inside the layer (a lone grouped matmul in its own call is dominated by
    # launch and dispatch: on an H200, 0.14-0.21 ms alone against 0.27 ms for the whole layer)
    x1 = x[:, :1]
    wbytes = 3 * c.top_k * c.dim * c.ffn_dim * dtype.itemsize
    case1 = "batch-1 MoE layer, decode blocks for all three grouped matmuls"
    for bs in SWEEP_DECODE:
        name = _label(bs)
        if left() < 0:
            break
        try:
            mm = functools.partial(gpu.gmm, block_sizes=bs)
            f = jax.jit(lambda p, x, mm=mm: mixtral.moe_layer(p, x, c, impl=mm, dispatch=True)[0])
            t = gbench.time_fn(f, p, x1, calls=50)
            log({"case": case1, "impl": f"ours {name}", "ms": t * 1e3, "GB/s": wbytes / t / 1e9})
        except Exception as e:
            log({"case": case1, "impl": f"ours {name}", "error": f"{type(e).__name__}: {e}"[:400]})


def _profile_batch1(c, p, x1, log, calls: int = 20):
    """Kernels of the batch-1 MoE layer (ours) per call: where the time beyond the weight reads goes."""
    import tempfile

    from eval.profile_decode import summarize

    f = jax.jit(lambda p, x: mixtral.moe_layer(p, x, c, impl="triton", dispatch=True)[0])
    jax.block_until_ready(f(p, x1))
    trace_dir = tempfile.mkdtemp(prefix="flashit_moe_trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            out = f(p, x1)
        jax.block_until_ready(out)
    try:
        log({"case": "batch-1 MoE layer, profile", **summarize(trace_dir, calls)})
    except Exception as e:  # a missing plane must not lose the rest of the run
        log({"case": "batch-1 MoE layer, profile", "error": f"{type(e).__name__}: {e}"[:400]})


def _layer(case, impls, *, c, p, x, flops, dense_rate, log, left):
    ref = jax.jit(lambda p, x: mixtral.moe_layer(p, x, c, impl="xla", dispatch=True)[0])(p, x)
    for name, mm in impls.items():
        if left() < 0:
            log({"case": case, "impl": name, "error": "skipped: time budget spent"})
            continue
        try:
            f = jax.jit(lambda p, x, mm=mm: mixtral.moe_layer(p, x, c, impl=mm, dispatch=True)[0])
            y = f(p, x)
            t = gbench.time_fn(f, p, x)
            log({"case": case, "impl": name, "ms": t * 1e3, "tflops": flops / t / 1e12,
                 "frac": flops / t / dense_rate, "rel_err_vs_xla": gbench.rel(y, ref),
                 "out_rms": float(jnp.sqrt(jnp.mean(jnp.square(y.astype(jnp.float32)))))})
        except Exception as e:
            log({"case": case, "impl": name, "error": f"{type(e).__name__}: {e}"[:400]})


def print_table(report):
    print(f"\n{report['device']}  jax {report['jax_version']}  {report['date']}")
    print(f"{'case':58s} {'impl':40s} {'ms':>8s} {'TFLOP/s':>8s} {'frac':>6s}  note")
    for r in report["rows"]:
        if "impl" not in r:
            print(f"{r['case']:58s} {r.get('dtype', ''):40s} " + " ".join(
                f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                if k not in ("case", "dtype")))
            continue
        if "error" in r:
            print(f"{r['case']:58s} {r['impl']:40s} ERROR {r['error'][:150]}")
            continue
        note = ""
        if "vs_dense" in r:
            note = f"{r['vs_dense']:.2f}x dense time, {r['GB/s']:.0f} GB/s" + (
                f", rel err {r['rel_err_vs_fp32']:.1e}" if "rel_err_vs_fp32" in r else "")
        elif "GB/s" in r:
            note = f"{r['GB/s']:.0f} GB/s of weights"
        elif "rel_err" in r or "rel_err_vs_xla" in r:
            note = f"rel err {r.get('rel_err', r.get('rel_err_vs_xla')):.1e}"
        tf = f"{r['tflops']:8.1f}" if "tflops" in r else " " * 8
        fr = f"{r['frac']:6.1%}" if "frac" in r else " " * 6
        print(f"{r['case'][:58]:58s} {r['impl'][:40]:40s} {r['ms']:8.3f} {tf} {fr}  {note}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
