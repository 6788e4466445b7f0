"""The decode GEMV of `gpu.py` with a weight per row picked from a stack: a mixture-of-experts step.

At batch 1 a Mixtral layer multiplies top_k rows, each by its own expert's [K, N] matrix out of
the [E, K, N] stack. Sorting rows into groups and running the grouped matmul (kernels/grouped_matmul)
costs a sort, a gather and tiles of 16 rows that are 1/8 full; here each program reads its row's
expert id and streams that expert's [bk, bn] tiles straight from the stack, as the dense GEMV does
(K split over programs, partial sums added by XLA). Gate and up share one launch: a program loads
x once and keeps one accumulator per weight. Only the chosen experts' weights are read; a row whose
expert another row also chose reads it again (the rows are few: `MAX_ROWS`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gemv.gpu import Blocks, _plan, _pow2_at_most

MAX_ROWS = 8
# the fastest of 18 tiles for the Mixtral batch-1 layer on an H200 (eval.bench_moe --gemv-sweep, docs/moe.md)
DEFAULT_BLOCKS = Blocks(bk=64, bn=128, target_programs=1056, num_warps=16)


def _kernel(ids_ref, x_ref, *refs, k: int, n: int, ks: int, bk: int, bn: int, nw: int):
    w_refs, o_refs = refs[:nw], refs[nw:]
    r = pl.program_id(0)
    e = plgpu.load(ids_ref.at[r])
    col = pl.program_id(1) * bn + jnp.arange(bn)
    cmask = col < n
    k0 = pl.program_id(2) * ks

    def body(i, accs):
        rows = k0 + i * bk + jnp.arange(bk)
        rmask = rows < jnp.minimum(k, k0 + ks)
        xr = plgpu.load(x_ref.at[r, rows], mask=rmask, other=0.0).astype(jnp.float32)[:, None]
        mask = rmask[:, None] & cmask[None, :]
        return tuple(acc + xr * plgpu.load(w.at[e, rows[:, None], col[None, :]], mask=mask, other=0).astype(jnp.float32)
                     for acc, w in zip(accs, w_refs))

    accs = jax.lax.fori_loop(0, pl.cdiv(ks, bk), body, tuple(jnp.zeros((bk, bn), jnp.float32) for _ in w_refs))
    for acc, o in zip(accs, o_refs):
        plgpu.store(o.at[pl.program_id(2), r, col], jnp.sum(acc, axis=0), mask=cmask)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def expert_matvec(x: jax.Array, ws: tuple[jax.Array, ...], ids: jax.Array, *, blocks: Blocks | None = None,
                  interpret: bool = False) -> tuple[jax.Array, ...]:
    """Row r of x [R, K] times ws[j][ids[r]] ([E, K, N] stacks, same shape) -> fp32 [R, N] per weight."""
    r, k = x.shape
    if not 1 <= r <= MAX_ROWS:
        raise ValueError(f"expert_matvec: {r} rows; the kernel serves 1 to {MAX_ROWS}")
    if not ws or any(w.ndim != 3 or w.shape != ws[0].shape for w in ws):
        raise ValueError(f"expert_matvec: weights must be [E, K, N] stacks of one shape, got "
                         f"{[tuple(w.shape) for w in ws]}")
    e, kw, n = ws[0].shape
    if kw != k:
        raise ValueError(f"expert_matvec: x has {k} features but the expert weights are {tuple(ws[0].shape)} ([E, K, N])")
    if ids.shape != (r,):
        raise ValueError(f"expert_matvec: ids has shape {tuple(ids.shape)}, expected ({r},): one expert per row")
    blocks = blocks or DEFAULT_BLOCKS
    # one [bk, bn] fp32 accumulator per weight, so each gets 1/len(ws) of the K tile (as rows do in
    # gpu.matvec); every row has its own programs, so each gets target_programs / R of them
    bk, bn, ncol, ks, splits = _plan(blocks, len(ws), k, n, _pow2_at_most(k),
                                     programs=pl.cdiv(blocks.target_programs, r))
    kernel = functools.partial(_kernel, k=k, n=n, ks=ks, bk=bk, bn=bn, nw=len(ws))
    outs = pl.pallas_call(
        kernel, grid=(r, ncol, splits),
        out_shape=tuple(jax.ShapeDtypeStruct((splits, r, n), jnp.float32) for _ in ws),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="flashit_expert_matvec",
    )(jnp.clip(ids.astype(jnp.int32), 0, e - 1), x, *ws)
    return tuple(o.sum(axis=0) if splits > 1 else o[0] for o in outs)


def reference(x, ws, ids):
    """What expert_matvec computes, in XLA: the chosen experts' matrices gathered per row."""
    return tuple(jnp.einsum("rk,rkn->rn", x, jnp.take(w, ids, axis=0), preferred_element_type=jnp.float32)
                 for w in ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _expert_matvec_vjp(x, ws, ids, blocks, interpret):
    return expert_matvec(x, ws, ids, blocks=blocks, interpret=interpret)


def _fwd(x, ws, ids, blocks, interpret):
    return _expert_matvec_vjp(x, ws, ids, blocks, interpret), (x, ws, ids)


def _bwd(blocks, interpret, res, cts):
    # decoding rarely differentiates; the gather's transpose (a scatter-add into the stack) serves it
    x, ws, ids = res
    _, vjp = jax.vjp(lambda x, ws: reference(x, ws, ids), x, ws)
    dx, dws = vjp(cts)
    return dx, dws, None


_expert_matvec_vjp.defvjp(_fwd, _bwd)


def swiglu_experts(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, ids: jax.Array, *,
                   blocks: Blocks | None = None, interpret: bool = False) -> jax.Array:
    """Row r of x [R, D] through expert ids[r]'s SwiGLU MLP (gate, up [E, D, F], down [E, F, D]) -> [R, D]
    in x's dtype (the hidden activation rounded to it, as the grouped-matmul path does); differentiable
    (the backward runs in XLA)."""
    ids = ids.astype(jnp.int32)
    g, u = _expert_matvec_vjp(x, (gate, up), ids, blocks, interpret)
    a = (jax.nn.silu(g.astype(x.dtype)) * u.astype(x.dtype)).astype(x.dtype)
    (y,) = _expert_matvec_vjp(a, (down,), ids, blocks, interpret)
    return y.astype(x.dtype)
