"""Grouped matmul on the GPU: our Pallas kernel against XLA's ragged_dot, tokamax (when
installed) and a dense matmul of the same FLOPs, all measured in the same run.

    python -m kernels.grouped_matmul.bench [--m 8192 --k 4096 --n 14336 --groups 8]

Also checks ours against ragged_dot (outputs and gradients, uneven and empty groups) first.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from kernels.grouped_matmul import api, common, gpu
from kernels.timing import time_calls

CONFIGS = {  # the first is gpu.DEFAULT_BLOCKS
    "128x256x64/w8s3": common.BlockSizes(128, 256, 64, num_warps=8, num_stages=3),
    "128x128x64/w4s3": common.BlockSizes(128, 128, 64, num_warps=4, num_stages=3),
    "128x256x64/w8s4": common.BlockSizes(128, 256, 64, num_warps=8, num_stages=4),
}


def time_fn(fn, *args, reps: int = 3, calls: int = 10) -> float:
    """Median over `reps` of the mean time of `calls` back-to-back calls (seconds)."""
    return time_calls(fn, *args, calls=calls, reps=reps)


def uneven_sizes(m: int, g: int, seed: int = 0) -> jnp.ndarray:
    """Random group sizes summing to m (multinomial, so boundaries fall inside tiles)."""
    sizes = np.random.default_rng(seed).multinomial(m, np.full(g, 1.0 / g))
    return jnp.asarray(sizes, jnp.int32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_against_ragged_dot(dtype=jnp.bfloat16, impl: str = "triton", grads: bool = True) -> dict:
    """Outputs and gradients of ours vs jax.lax.ragged_dot on the device (uneven + empty groups)."""
    m, k, n = 1000, 256, 512
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((6, k, n)) / np.sqrt(k), dtype)
    gs = jnp.asarray([300, 0, 17, 450, 0, 200], jnp.int32)  # 33 tail rows
    cot = jnp.asarray(rng.standard_normal((m, n)), dtype)

    def loss(mm):
        return lambda a, b: jnp.sum((mm(a, b) * cot).astype(jnp.float32))

    ours = jax.jit(lambda a, b: api.grouped_matmul(a, b, gs, impl=impl))
    # HIGHEST: XLA's default for fp32 on GPUs is TF32, which would be the larger error here
    ref = jax.jit(lambda a, b: jax.lax.ragged_dot(a, b, gs, preferred_element_type=jnp.float32,
                                                  precision=jax.lax.Precision.HIGHEST))
    g_ours = jax.jit(jax.grad(loss(lambda a, b: api.grouped_matmul(a, b, gs, impl=impl)), argnums=(0, 1)))
    g_ref = jax.jit(jax.grad(loss(lambda a, b: jax.lax.ragged_dot(a, b, gs)), argnums=(0, 1)))
    o = ours(lhs, rhs)
    out = {"dtype": jnp.dtype(dtype).name, "out_rel": rel(o, ref(lhs, rhs)),
           "tail_zero": bool(np.all(np.asarray(o[967:]) == 0))}
    if grads:
        ga, gr = g_ours(lhs, rhs), g_ref(lhs, rhs)
        out.update(dlhs_rel=rel(ga[0], gr[0]), drhs_rel=rel(ga[1], gr[1]),
                   empty_group_grad_zero=bool(np.all(np.asarray(ga[1][1]) == 0)))
    return out


def tokamax_ragged_dot(implementation: str):
    import tokamax

    return lambda lhs, rhs, gs: tokamax.ragged_dot(lhs, rhs, gs, implementation=implementation)


def jax_mgpu_example():
    """JAX's own Mosaic GPU ragged_dot example kernel (Hopper), as shipped with jax."""
    import functools

    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    f = functools.partial(ragged_dot_mgpu.ragged_dot, block_m=128, block_n=128, block_k=64,
                          max_concurrent_steps=4, grid_block_n=1)
    return lambda lhs, rhs, gs: f(lhs, rhs, group_sizes=gs)


def alternatives() -> dict:
    """name -> grouped matmul callable (lhs, rhs, group_sizes) for every alternative present."""
    out = {"xla ragged_dot": lambda a, b, g: jax.lax.ragged_dot(a, b, g)}
    for name, make in (("tokamax mosaic", lambda: tokamax_ragged_dot("mosaic")),
                       ("tokamax triton", lambda: tokamax_ragged_dot("triton")),
                       ("jax mgpu example", jax_mgpu_example)):
        try:
            out[name] = make()
        except Exception as e:  # not installed / not this jax
            print(f"  ({name} unavailable: {type(e).__name__}: {str(e)[:120]})", flush=True)
    return out


def bench_gmm(m: int, k: int, n: int, groups: int, dtype=jnp.bfloat16, configs=CONFIGS, others=None,
              log=print) -> list[dict]:
    key = jax.random.key(0)
    lhs = jax.random.normal(key, (m, k), dtype)
    rhs = (jax.random.normal(jax.random.fold_in(key, 1), (groups, k, n), dtype) * (k ** -0.5)).astype(dtype)
    gs = uneven_sizes(m, groups)
    flops = 2 * m * k * n
    dense_w = rhs[0]
    dense = time_fn(jax.jit(lambda a, b: a @ b), lhs, dense_w)
    rows = [{"case": f"gmm M{m} K{k} N{n} G{groups}", "impl": "dense matmul", "ms": dense * 1e3,
             "tflops": flops / dense / 1e12, "frac": 1.0}]
    log(rows[-1])
    ref = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g, preferred_element_type=jnp.float32))(lhs, rhs, gs)
    impls = {f"ours {name}": (lambda a, b, g, bs=bs: gpu.gmm(a, b, g, block_sizes=bs)) for name, bs in configs.items()}
    impls.update(others or {})
    for name, fn in impls.items():
        try:
            f = jax.jit(fn)
            err = rel(f(lhs, rhs, gs), ref)
            t = time_fn(f, lhs, rhs, gs)
            rows.append({"case": rows[0]["case"], "impl": name, "ms": t * 1e3, "tflops": flops / t / 1e12,
                         "frac": dense / t, "rel_err": err})
        except Exception as e:
            rows.append({"case": rows[0]["case"], "impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        log(rows[-1])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--groups", type=int, default=8)
    args = ap.parse_args(argv)
    print(jax.devices()[0].device_kind, jax.__version__)
    print(check_against_ragged_dot())
    for r in bench_gmm(args.m, args.k, args.n, args.groups, others=alternatives(), log=lambda r: None):
        print(r)


if __name__ == "__main__":
    main()
