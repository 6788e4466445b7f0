"""Pallas TPU grouped matmul in the megablox style (tested in interpret mode on CPU).

The tile schedule is prefetched into SMEM and drives the BlockSpec index maps, so the
pipeline DMAs exactly the lhs tile and the group's rhs tile each step. A TPU core walks the
grid in order and keeps an output block in VMEM while consecutive steps map to it, so the
visits of a row tile shared by several groups merge their rows into one block with a masked
select before it is written back once.

gmm grid: (N tiles, work items, K tiles); tgmm grid: (K tiles, N tiles, work items), the
accumulator reset at a group's first work item and stored at its last.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.grouped_matmul.common import BlockSizes, make_schedule

DEFAULT_BLOCKS = BlockSizes(block_m=128, block_n=128, block_k=128)


def _pad_rows(x, mp: int):
    return x if x.shape[0] == mp else jnp.pad(x, ((0, mp - x.shape[0]), (0, 0)))


def _gmm_kernel(offs, gids, tids, lhs_ref, rhs_ref, o_ref, acc_ref, *, num_groups, nk, bm, transpose_rhs):
    w, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], dims, preferred_element_type=jnp.float32)

    @pl.when(kk == nk - 1)
    def _():
        gi = gids[w]
        rows = tids[w] * bm + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= offs[gi]) & (rows < offs[gi + 1])
        val = jnp.where(gi < num_groups, acc_ref[...], 0.0)  # the tail group is zeros
        o_ref[...] = jnp.where(mine, val, o_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_sizes", "interpret"))
def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None,
        block_sizes: BlockSizes = DEFAULT_BLOCKS, interpret: bool = False):
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bs = block_sizes.fit(m, k, n)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    mp = -(-m // bm) * bm
    sched = make_schedule(group_sizes, m, bm, repeat_last=True)
    num_items = sched.group_ids.shape[0]
    nk = k // bk

    def lhs_map(j, w, kk, offs, gids, tids):
        return tids[w], kk

    def rhs_map(j, w, kk, offs, gids, tids):
        ge = jnp.minimum(gids[w], g - 1)
        return (ge, j, kk) if transpose_rhs else (ge, kk, j)

    def out_map(j, w, kk, offs, gids, tids):
        return tids[w], j

    rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
    kernel = functools.partial(_gmm_kernel, num_groups=g, nk=nk, bm=bm, transpose_rhs=transpose_rhs)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.dtype(out_dtype or lhs.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(n // bn, num_items, nk),
            in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((bm, bn), out_map),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="grouped_matmul_tpu",
    )(sched.offsets, sched.group_ids, sched.tile_ids, _pad_rows(lhs, mp), rhs.astype(lhs.dtype))
    return out[:m] if mp != m else out


def _tgmm_kernel(offs, gids, tids, num_active, lhs_ref, d_ref, o_ref, acc_ref, *, num_items, bm):
    w = pl.program_id(2)
    gi = gids[w]
    first_visit = (w == 0) | (gi != gids[jnp.maximum(w - 1, 0)])
    last_visit = (w == num_items - 1) | (gi != gids[jnp.minimum(w + 1, num_items - 1)])

    @pl.when(first_visit)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    rows = tids[w] * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    # items past num_active repeat the last one: they must add nothing
    mine = (rows >= offs[gi]) & (rows < offs[gi + 1]) & (w < num_active[0])
    a = jnp.where(mine, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
    d = jnp.where(mine, d_ref[...], jnp.zeros((), d_ref.dtype))
    acc_ref[...] += lax.dot_general(a, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(last_visit)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "block_sizes", "interpret"))
def tgmm(lhs, dout, group_sizes, *, num_groups: int, out_dtype=None, block_sizes: BlockSizes = DEFAULT_BLOCKS,
         interpret: bool = False):
    m, k = lhs.shape
    n = dout.shape[1]
    bs = block_sizes.fit(m, k, n)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    mp = -(-m // bm) * bm
    sched = make_schedule(group_sizes, m, bm, tail=False, visit_empty=True, repeat_last=True)
    num_items = sched.group_ids.shape[0]

    def lhs_map(kt, j, w, offs, gids, tids, na):
        return tids[w], kt

    def d_map(kt, j, w, offs, gids, tids, na):
        return tids[w], j

    def out_map(kt, j, w, offs, gids, tids, na):
        return gids[w], kt, j

    kernel = functools.partial(_tgmm_kernel, num_items=num_items, bm=bm)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), jnp.dtype(out_dtype or lhs.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(k // bk, n // bn, num_items),
            in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec((bm, bn), d_map)],
            out_specs=pl.BlockSpec((None, bk, bn), out_map),
            scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="grouped_matmul_rhs_grad_tpu",
    )(sched.offsets, sched.group_ids, sched.tile_ids, sched.num_active[None], _pad_rows(lhs, mp),
      _pad_rows(dout.astype(lhs.dtype), mp))
