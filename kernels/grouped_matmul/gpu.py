"""Pallas grouped matmul lowered through Triton (any CUDA GPU; tl.dot becomes wgmma on Hopper).

gmm: one program per (work item, column tile). A work item is a row tile of one group
(common.make_schedule); its K loop reads only that group's matrix, so experts that got no
rows are never read (batch-1 decoding reads only the chosen experts). A row tile shared by two
groups is computed by two programs that store disjoint rows through a row mask, so no output
element has two writers. Program ids are swizzled in bands of `group_m` work items so that the
programs running together share rhs column tiles in L2.

tgmm (the rhs gradient): one program per (group, K tile, N tile) looping over the group's rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.grouped_matmul.common import BlockSizes, make_schedule

# bf16 on Hopper: `python -m eval.bench_moe --sweep` on an H200 (2026-12-04) put 128x256x64 tiles, 8 warps,
# 3 stages first of 7 (65.2% of a dense matmul's rate in the Mixtral layer, against 58.8% for 128x128x64/w4s3;
# 4 stages: 65.7%, but 196 KB of shared memory, more than an A100 has). 3 stages fit 147 KB.
DEFAULT_BLOCKS = BlockSizes(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
# decoding (a few rows): memory-bound, so narrow column tiles for more programs streaming weights
DECODE_BLOCKS = BlockSizes(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
# the rhs gradient contracts over rows: short row steps, square output tiles
DEFAULT_TGMM_BLOCKS = BlockSizes(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3)


def _precision(dtype):
    # fp32 inputs: exact fp32 products (Triton would otherwise use tf32); 16-bit: native MMA.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _pad_rows(x, mp: int):
    return x if x.shape[0] == mp else jnp.pad(x, ((0, mp - x.shape[0]), (0, 0)))


def _gmm_kernel(offs_ref, gid_ref, tid_ref, lhs_ref, rhs_ref, o_ref, *, num_groups, num_items, tiles_n, nk,
                bm, bn, bk, group_m, transpose_rhs, precision):
    pid = pl.program_id(0)
    band = group_m * tiles_n
    first = (pid // band) * group_m
    size = jnp.minimum(num_items - first, group_m)
    w = first + (pid % band) % size
    j = (pid % band) // size
    gi = gid_ref[w]
    row0 = pl.multiple_of(tid_ref[w] * bm, bm)
    col0 = pl.multiple_of(j * bn, bn)
    start = offs_ref[gi]
    end = offs_ref[gi + 1]
    ge = jnp.minimum(gi, num_groups - 1)
    # the tail group (rows past the groups) and unused items run no K loop: zeros / no store.
    # (Arithmetic, not jnp.where: the Triton lowering of a select between two literals emits
    # i1 constants on jax 0.10-0.11, which then fail to verify as loop bounds.)
    trips = (gi < num_groups).astype(jnp.int32) * nk
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def body(kk, acc):
        k0 = pl.multiple_of(kk * bk, bk)
        a = lhs_ref[pl.ds(row0, bm), pl.ds(k0, bk)]
        if transpose_rhs:
            b = rhs_ref[ge, pl.ds(col0, bn), pl.ds(k0, bk)]
        else:
            b = rhs_ref[ge, pl.ds(k0, bk), pl.ds(col0, bn)]
        return acc + lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, trips, body, jnp.zeros((bm, bn), jnp.float32))
    rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    mask = (rows >= start) & (rows < end)
    plgpu.store(o_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], acc.astype(o_ref.dtype), mask=mask)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None,
        block_sizes: BlockSizes | None = None, interpret: bool = False):
    """[M, N] = ragged_dot(lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs), group_sizes)."""
    if block_sizes is None:
        block_sizes = DECODE_BLOCKS if lhs.shape[0] <= 64 else DEFAULT_BLOCKS
    return _gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_sizes", "interpret"))
def _gmm(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, block_sizes: BlockSizes, interpret):
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bs = block_sizes.fit(m, k, n)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    mp = -(-m // bm) * bm
    sched = make_schedule(group_sizes, m, bm)
    num_items = sched.group_ids.shape[0]
    tiles_n = n // bn
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    kernel = functools.partial(
        _gmm_kernel, num_groups=g, num_items=num_items, tiles_n=tiles_n, nk=k // bk, bm=bm, bn=bn, bk=bk,
        group_m=bs.group_m, transpose_rhs=transpose_rhs, precision=_precision(lhs.dtype))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(num_items * tiles_n,),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(sched.offsets, sched.group_ids, sched.tile_ids, _pad_rows(lhs, mp), rhs.astype(lhs.dtype))
    return out[:m] if mp != m else out


def _tgmm_kernel(offs_ref, lhs_ref, d_ref, o_ref, *, bm, bn, bk, precision):
    j, kt, gi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = pl.multiple_of(j * bn, bn)
    k0 = pl.multiple_of(kt * bk, bk)
    start = offs_ref[gi]
    end = offs_ref[gi + 1]
    first = start // bm
    trips = (end > start).astype(jnp.int32) * ((end + bm - 1) // bm - first)

    def body(i, acc):
        r0 = pl.multiple_of((first + i) * bm, bm)
        rows = r0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        keep = (rows >= start) & (rows < end)
        a = plgpu.load(lhs_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], mask=jnp.broadcast_to(keep, (bm, bk)), other=0)
        d = plgpu.load(d_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], mask=jnp.broadcast_to(keep, (bm, bn)), other=0)
        return acc + lax.dot_general(a, d, (((0,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, trips, body, jnp.zeros((bk, bn), jnp.float32))
    o_ref[gi, pl.ds(k0, bk), pl.ds(n0, bn)] = acc.astype(o_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, num_groups: int, out_dtype=None, block_sizes: BlockSizes | None = None,
         interpret: bool = False):
    """[G, K, N]: lhs_g^T @ dout_g per group (zeros for empty groups)."""
    return _tgmm(lhs, dout, group_sizes, num_groups=num_groups, out_dtype=out_dtype,
                 block_sizes=block_sizes or DEFAULT_TGMM_BLOCKS, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "block_sizes", "interpret"))
def _tgmm(lhs, dout, group_sizes, *, num_groups, out_dtype, block_sizes: BlockSizes, interpret):
    m, k = lhs.shape
    n = dout.shape[1]
    bs = block_sizes.fit(m, k, n)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    mp = -(-m // bm) * bm
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    kernel = functools.partial(_tgmm_kernel, bm=bm, bn=bn, bk=bk, precision=_precision(lhs.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), jnp.dtype(out_dtype or lhs.dtype)),
        grid=(n // bn, k // bk, num_groups),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="grouped_matmul_rhs_grad",
    )(offsets, _pad_rows(lhs, mp), _pad_rows(dout.astype(lhs.dtype), mp))
