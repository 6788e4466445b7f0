"""Pallas (Triton) kernel: int8 activations x packed 2-bit ternary weights, int32 accumulation.

Each byte of the packed weight tile holds four ternary codes of four *different* output tiles
(quarters of N, see `reference`), so a program unpacks one [step, bn] byte tile with shifts
into four int8 {-1, 0, 1} tiles and runs four int8 dots (tensor-core IMMA) into four int32
accumulators: the weight bytes are read once, 1/8 of a bf16 matrix, and never widened in memory.
The per-row activation scale and the weight scale are applied once, after the K loop.

Decode (M <= 16) runs one 16-row tile (rows padded) and splits K over `k_splits` programs
(int32 partial sums added by XLA) so that enough programs keep the memory system busy.
No backward pass: ternary weights are trained through `flashit_jax.quant.ternary`'s
straight-through fake quantization; this kernel serves the packed model.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

PLANES = 4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_m: int = 16
    block_n: int = 64  # packed columns per program (4x as many output columns)
    block_k: int = 128  # rows per K step
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def default_blocks(m: int, k: int, n4: int, sm_count: int = 132) -> BlockSizes:
    """Small M: 16-row tile, K split until about two programs per SM; larger M: bigger row tiles."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = _largest_pow2_divisor(n4, 64 if m <= 16 else 32)
    block_k = _largest_pow2_divisor(k, 128)
    programs = -(-m // block_m) * (n4 // block_n)
    steps = k // block_k
    k_splits = 1
    for d in range(2, steps + 1):
        if programs * k_splits >= 2 * sm_count:
            break
        if steps % d == 0 and steps // d >= 2:
            k_splits = d
    return BlockSizes(block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits,
                      num_warps=4, num_stages=3 if m <= 16 else 2)


def supported(m: int, k: int, n: int, blocks: BlockSizes | None = None) -> str:
    """'' if the kernel runs this problem, else why not (callers fall back to XLA)."""
    if n % PLANES:
        return f"N={n} is not a multiple of {PLANES}"
    n4 = n // PLANES
    b = blocks or default_blocks(m, k, n4)
    if b.block_n < 16 or n4 % b.block_n:
        return f"no power-of-two tile >= 16 divides the {n4} packed columns"
    if b.block_k < 32 or k % b.block_k:
        return f"no power-of-two row step >= 32 divides K={k} (int8 dots need 32)"
    if (k // b.block_k) % b.k_splits:
        return f"k_splits={b.k_splits} does not divide the {k // b.block_k} row steps"
    return ""


def _kernel(xq_ref, sx_ref, q_ref, *refs, n_steps, step, scaled):
    s_refs, o_refs = (refs[:PLANES], refs[PLANES:]) if scaled else ((), refs)
    bm, bn = xq_ref.shape[0], q_ref.shape[1]

    def body(t, accs):
        a = xq_ref[:, pl.ds(t * step, step)]
        qb = q_ref[pl.ds(t * step, step), :]
        new = []
        for p in range(PLANES):
            w = ((qb >> (2 * p)) & 3).astype(jnp.int8) - jnp.int8(1)
            new.append(accs[p] + jnp.dot(a, w, preferred_element_type=jnp.int32))
        return tuple(new)

    zero = jnp.zeros((bm, bn), jnp.int32)
    accs = jax.lax.fori_loop(0, n_steps, body, (zero,) * PLANES)
    for p in range(PLANES):
        if scaled:
            y = accs[p].astype(jnp.float32) * sx_ref[...] * s_refs[p][...].astype(jnp.float32)
            o_refs[p][...] = y.astype(o_refs[p].dtype)
        else:
            o_refs[p][...] = accs[p]


def ternary_matmul(xq, sx, packed, sw, *, n: int, out_dtype=jnp.float32, blocks: BlockSizes | None = None,
                   interpret: bool = False):
    """(xq int8 [M, K] * sx fp32 [M, 1]) @ (ternary [K, N] * sw [1, N] or [1, 1])."""
    m, k = xq.shape
    n4 = n // PLANES
    if packed.shape != (k, n4):
        raise ValueError(f"ternary kernel: packed weights {packed.shape}, expected {(k, n4)}")
    b = blocks or default_blocks(m, k, n4)
    why = supported(m, k, n, b)
    if why:
        raise ValueError(f"ternary GPU kernel: {why}")
    sw = jnp.broadcast_to(sw.astype(jnp.float32), (1, n))
    sx = sx.astype(jnp.float32)
    m_pad = -(-m // b.block_m) * b.block_m
    if m_pad != m:  # padded rows are zeros: they add nothing and are sliced off
        xq = jnp.pad(xq, ((0, m_pad - m), (0, 0)))
        sx = jnp.pad(sx, ((0, m_pad - m), (0, 0)))
    splits = b.k_splits
    k_split = k // splits
    nb = n4 // b.block_n
    grid = (m_pad // b.block_m, nb, splits)
    in_specs = [pl.BlockSpec((b.block_m, k_split), lambda i, j, s: (i, s)),
                pl.BlockSpec((b.block_m, 1), lambda i, j, s: (i, 0)),
                pl.BlockSpec((k_split, b.block_n), lambda i, j, s: (s, j))]
    args = [xq, sx, packed]
    scaled = splits == 1
    if scaled:  # one program owns the whole K range: scale in the kernel, write out_dtype
        in_specs += [pl.BlockSpec((1, b.block_n), (lambda i, j, s, p=p: (0, j + p * nb))) for p in range(PLANES)]
        args += [sw] * PLANES
        out_shape = [jax.ShapeDtypeStruct((m_pad, n4), out_dtype)] * PLANES
        out_specs = [pl.BlockSpec((b.block_m, b.block_n), lambda i, j, s: (i, j))] * PLANES
    else:  # int32 partial sums per K split (exact), added and scaled by XLA
        out_shape = [jax.ShapeDtypeStruct((splits, m_pad, n4), jnp.int32)] * PLANES
        out_specs = [pl.BlockSpec((None, b.block_m, b.block_n), lambda i, j, s: (s, i, j))] * PLANES
    outs = pl.pallas_call(
        functools.partial(_kernel, n_steps=k_split // b.block_k, step=b.block_k, scaled=scaled),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
        interpret=interpret, name="ternary_matmul",
    )(*args)
    y = jnp.concatenate(outs, axis=-1)
    if not scaled:
        y = (y.sum(axis=0).astype(jnp.float32) * sx * sw).astype(out_dtype)
    return y[:m]
