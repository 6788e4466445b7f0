"""Pallas (Triton-lowered) decode kernels for sparse weights and sparse activations.

Decoding a few tokens is a chain of matrix-vector products bound by the bytes of weight read,
so a sparse format speeds it up only if the kernel reads fewer bytes. Both kernels follow
`kernels.gemv.gpu`: a grid of (column block, K split) programs, each streaming a [rows, bn]
tile per iteration into an elementwise fp32 accumulator that is reduced once at the end; the
K-split partial sums are added by XLA.

`act_sparse_matvec` (online pruning): x has been thresholded (TEAL/CATS); the load of W's row
k is predicated on x[:, k] != 0, so rows of dropped inputs are never read ([in, out] storage
makes a row one contiguous run of the output columns).

`nm_matvec` (N:M weights, see `reference`): reads the n value planes and one metadata word per
group instead of m dense rows; the input of each kept value is picked from the m inputs of its
group with m - 1 selects (no gather). 2:4 in bf16 reads 1.25 of 2 bytes per weight.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.sparse_matmul.reference import nm_bits

MAX_ROWS = 8


@dataclasses.dataclass(frozen=True)
class Blocks:
    bk: int = 64  # rows of W (act-sparse) or groups of m rows (N:M) per iteration
    bn: int = 128  # output columns per program
    target_programs: int = 528  # ~4 per SM on an H100 (132 SMs)
    num_warps: int = 4


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def supported(m: int, x_dtype, w_dtype) -> str:
    """'' if the kernels take this case, else why not."""
    if m > MAX_ROWS:
        return f"{m} rows (the decode kernels take at most {MAX_ROWS})"
    for name, dt in (("activations", x_dtype), ("weights", w_dtype)):
        if jnp.dtype(dt) not in (jnp.bfloat16, jnp.float16, jnp.float32):
            return f"{name} of dtype {jnp.dtype(dt)}"
    return ""


def _split(k: int, n: int, blocks: Blocks):
    bk = min(blocks.bk, _pow2_at_most(k))
    bn = min(blocks.bn, max(16, _pow2_at_most(n)))
    ncol = pl.cdiv(n, bn)
    splits = max(1, min(pl.cdiv(blocks.target_programs, ncol), pl.cdiv(k, bk)))
    ks = pl.cdiv(pl.cdiv(k, splits), bk) * bk  # rows per split, a multiple of bk
    return bk, bn, ncol, pl.cdiv(k, ks), ks


# ----------------------------------------------------------------------------- activation sparsity
def _act_kernel(x_ref, w_ref, o_ref, *, m: int, k: int, n: int, ks: int, bk: int, bn: int):
    col = pl.program_id(0) * bn + jnp.arange(bn)
    cmask = col < n
    k0 = pl.program_id(1) * ks

    def body(i, accs):
        rows = k0 + i * bk + jnp.arange(bk)
        rmask = rows < jnp.minimum(k, k0 + ks)
        xs = [plgpu.load(x_ref.at[r, rows], mask=rmask, other=0.0).astype(jnp.float32) for r in range(m)]
        live = xs[0] != 0.0
        for r in range(1, m):
            live = live | (xs[r] != 0.0)
        # the only weight bytes read: rows of inputs that survived the threshold
        w = plgpu.load(w_ref.at[rows[:, None], col[None, :]], mask=(rmask & live)[:, None] & cmask[None, :],
                       other=0.0).astype(jnp.float32)
        return tuple(accs[r] + xs[r][:, None] * w for r in range(m))

    accs = jax.lax.fori_loop(0, pl.cdiv(ks, bk), body, tuple(jnp.zeros((bk, bn), jnp.float32) for _ in range(m)))
    for r in range(m):
        plgpu.store(o_ref.at[pl.program_id(1), r, col], jnp.sum(accs[r], axis=0), mask=cmask)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def act_sparse_matvec(x: jax.Array, w: jax.Array, *, blocks: Blocks = Blocks(), interpret: bool = False):
    """x [M, K] (already sparsified: zeros are skipped) @ w [K, N] -> fp32 [M, N], M <= 8."""
    m, k = x.shape
    n = w.shape[1]
    bk, bn, ncol, splits, ks = _split(k, n, blocks)
    kernel = functools.partial(_act_kernel, m=m, k=k, n=n, ks=ks, bk=bk, bn=bn)
    partial = pl.pallas_call(
        kernel, grid=(ncol, splits), out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps), interpret=interpret,
        name="flashit_act_sparse_matvec",
    )(x, w)
    return partial.sum(axis=0) if splits > 1 else partial[0]


# ----------------------------------------------------------------------------- N:M weights
def _nm_kernel(xg_ref, v_ref, meta_ref, o_ref, *, rows: int, n: int, m: int, g: int, cols: int, gs: int, bg: int,
               bn: int):
    bits = nm_bits(m)
    col = pl.program_id(0) * bn + jnp.arange(bn)
    cmask = col < cols
    g0 = pl.program_id(1) * gs

    def body(i, accs):
        grp = g0 + i * bg + jnp.arange(bg)
        gmask = grp < jnp.minimum(g, g0 + gs)
        tmask = gmask[:, None] & cmask[None, :]
        meta = plgpu.load(meta_ref.at[grp[:, None], col[None, :]], mask=tmask, other=0).astype(jnp.int32)
        # the m inputs of each group, one [bg] vector per in-group position
        xs = [[plgpu.load(xg_ref.at[r * m + j, grp], mask=gmask, other=0.0).astype(jnp.float32)
               for j in range(m)] for r in range(rows)]
        out = list(accs)
        for p in range(n):
            v = plgpu.load(v_ref.at[(p * g + grp)[:, None], col[None, :]], mask=tmask, other=0.0).astype(jnp.float32)
            pos = (meta >> (bits * p)) & ((1 << bits) - 1)
            for r in range(rows):
                sel = jnp.broadcast_to(xs[r][m - 1][:, None], (bg, bn))
                for j in range(m - 2, -1, -1):
                    sel = jnp.where(pos == j, xs[r][j][:, None], sel)
                out[r] = out[r] + v * sel
        return tuple(out)

    accs = jax.lax.fori_loop(0, pl.cdiv(gs, bg), body,
                             tuple(jnp.zeros((bg, bn), jnp.float32) for _ in range(rows)))
    for r in range(rows):
        plgpu.store(o_ref.at[pl.program_id(1), r, col], jnp.sum(accs[r], axis=0), mask=cmask)


@functools.partial(jax.jit, static_argnames=("n", "m", "blocks", "interpret"))
def nm_matvec(x: jax.Array, values: jax.Array, meta: jax.Array, *, n: int, m: int, blocks: Blocks = Blocks(),
              interpret: bool = False):
    """x [M, K] @ W [K, N] for W stored N:M (values [n, K/m, N], meta [K/m, N]) -> fp32 [M, N]."""
    rows, k = x.shape
    _, g, cols = values.shape
    if g * m != k:
        raise ValueError(f"x has {k} features; the N:M weight has {g} groups of {m}")
    # [M, K] -> [M * m, K/m]: row r*m + j holds input j of every group (a contiguous load per position)
    xg = x.reshape(rows, g, m).transpose(0, 2, 1).reshape(rows * m, g)
    bg, bn, ncol, splits, gs = _split(g, cols, blocks)
    kernel = functools.partial(_nm_kernel, rows=rows, n=n, m=m, g=g, cols=cols, gs=gs, bg=bg, bn=bn)
    partial = pl.pallas_call(
        kernel, grid=(ncol, splits), out_shape=jax.ShapeDtypeStruct((splits, rows, cols), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps), interpret=interpret,
        name="flashit_nm_matvec",
    )(xg, values.reshape(n * g, cols), meta)
    return partial.sum(axis=0) if splits > 1 else partial[0]
