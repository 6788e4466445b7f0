"""Pallas (Triton) decode kernel for AQLM weights: lookup and accumulate.

At decode (a few rows of x), the dot of x with every codebook entry is cheap and tiny:
LUT[r, m, g, j] = x[r, g*d:(g+1)*d] . codebooks[m, j] ([R, M, G, 2^B], 512 KiB fp32 per row for
K = 4096, 2x8; XLA computes it). Then each output is a sum of table lookups:

    y[r, n] = scales[n] * sum_{m, g} LUT[r, m, g, codes[m, g, n]]

so the kernel reads each 2-bit-per-weight code once and never forms a weight. One program
owns `block_n` columns of one row over G / k_splits groups, walking `block_g` groups per step:
it loads a [block_g, block_n] tile of codes per codebook, gathers the table entries (Triton
pointer gathers; the table stays in L2) and adds them up in fp32. With k_splits > 1 the
partial sums are added by XLA. Prefill (many rows) goes through XLA's dequantize + dot.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.aqlm.reference import lookup_tables

MAX_ROWS = 8  # above this, the per-row code traffic makes dequantize + tensor-core dot the better path


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_n: int = 128
    block_g: int = 16
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def default_blocks(rows: int, g: int, n: int, sm_count: int = 132) -> BlockSizes:
    block_n = _pow2_divisor(n, 256)
    block_g = _pow2_divisor(g, 16)
    programs = rows * (n // block_n)
    steps = g // block_g
    k_splits = 1
    while programs * k_splits < 2 * sm_count and steps % (k_splits * 2) == 0 and steps // (k_splits * 2) >= 2:
        k_splits *= 2
    return BlockSizes(block_n=block_n, block_g=block_g, k_splits=k_splits)


def supported(rows: int, g: int, n: int, blocks: BlockSizes | None = None) -> str:
    """'' if the kernel runs this problem, else why not (callers fall back to XLA)."""
    if rows > MAX_ROWS:
        return f"{rows} rows: the lookup kernel serves decode (<= {MAX_ROWS} rows)"
    b = blocks or default_blocks(rows, g, n)
    if b.block_n < 16 or n % b.block_n or b.block_n & (b.block_n - 1):
        return f"no power-of-two column tile >= 16 divides N={n}"
    if g % b.block_g or b.block_g & (b.block_g - 1):
        return f"block_g={b.block_g} is not a power of two dividing the {g} groups"
    if (g // b.block_g) % b.k_splits:
        return f"k_splits={b.k_splits} does not divide the {g // b.block_g} group steps"
    return ""


def _kernel(lut_ref, codes_ref, s_ref, o_ref, *, n_cb, n_groups, entries, block_g, n_steps, g_split):
    split = pl.program_id(2)
    bn = codes_ref.shape[-1]
    gi = jax.lax.broadcasted_iota(jnp.int32, (block_g, bn), 0)

    def body(t, acc):
        g0 = t * block_g
        for m in range(n_cb):
            c = codes_ref[m, pl.ds(g0, block_g), :].astype(jnp.int32)
            # flat LUT index of (m, global group, code)
            idx = ((m * n_groups + split * g_split + g0) + gi) * entries + c
            acc = acc + jnp.sum(lut_ref[idx], axis=0, keepdims=True)
        return acc

    acc = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((1, bn), jnp.float32))
    if s_ref is None:  # a partial sum over one K split: XLA adds them, then scales
        o_ref[...] = acc
    else:
        o_ref[...] = (acc * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _kernel_split(lut_ref, codes_ref, o_ref, **kw):
    _kernel(lut_ref, codes_ref, None, o_ref, **kw)


def aqlm_matmul(x2, codes, codebooks, scales, *, out_dtype=None, blocks: BlockSizes | None = None,
                interpret: bool = False):
    """x2 [R, K] @ W [K, N] for the AQLM format of `kernels.aqlm.reference`, R <= MAX_ROWS."""
    r, k = x2.shape
    n_cb, g, n = codes.shape
    entries = codebooks.shape[1]
    out_dtype = out_dtype or x2.dtype
    b = blocks or default_blocks(r, g, n)
    why = supported(r, g, n, b)
    if why:
        raise ValueError(f"AQLM GPU kernel: {why}")
    lut = lookup_tables(x2, codebooks).reshape(r, n_cb * g * entries)
    splits = b.k_splits
    g_split = g // splits
    grid = (r, n // b.block_n, splits)
    kw = dict(n_cb=n_cb, n_groups=g, entries=entries, block_g=b.block_g, n_steps=g_split // b.block_g,
              g_split=g_split)
    lut_spec = pl.BlockSpec((None, n_cb * g * entries), lambda i, j, s: (i, 0))
    codes_spec = pl.BlockSpec((n_cb, g_split, b.block_n), lambda i, j, s: (0, s, j))
    params = plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages)
    if splits == 1:
        y = pl.pallas_call(
            functools.partial(_kernel, **kw), grid=grid,
            in_specs=[lut_spec, codes_spec, pl.BlockSpec((1, b.block_n), lambda i, j, s: (0, j))],
            out_specs=pl.BlockSpec((1, b.block_n), lambda i, j, s: (i, j)),
            out_shape=jax.ShapeDtypeStruct((r, n), out_dtype),
            compiler_params=params, interpret=interpret, name="aqlm_lut",
        )(lut, codes, scales)
        return y
    parts = pl.pallas_call(
        functools.partial(_kernel_split, **kw), grid=grid,
        in_specs=[lut_spec, codes_spec],
        out_specs=pl.BlockSpec((None, 1, b.block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, r, n), jnp.float32),
        compiler_params=params, interpret=interpret, name="aqlm_lut_split",
    )(lut, codes)
    return (parts.sum(axis=0) * scales.astype(jnp.float32)).astype(out_dtype)
