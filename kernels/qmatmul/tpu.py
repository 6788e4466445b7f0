"""Pallas (Mosaic TPU) kernel for weight-only quantized matmuls ("i8", "u8", "u4x2").

The grid walks (M tiles, N tiles, K steps); the K axis is the innermost, sequential one and
accumulates into an fp32 VMEM scratch, so that Pallas' pipeline streams the packed weight
tiles HBM -> VMEM while the MXU works on the previous one. Each K step is one quantization
group (or `block_k` rows when there is one scale per column); the group's scale is applied
after its dot, as in the GPU kernel. Scales and zeros travel as [G, 1, N] so that a block of
one group is (1, block_n) in its last two dims, which Mosaic accepts as a full dimension.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUPPORTED_PACKINGS = ("i8", "u8", "u4x2")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_m: int = 128
    block_n: int = 256  # packed columns per program
    block_k: int = 512  # rows per step when there is one scale per column


def _divisor(n: int, cap: int, multiple: int) -> int:
    """Largest d <= cap with d % multiple == 0 and n % d == 0 (0 if none)."""
    best = 0
    for d in range(multiple, min(cap, n) + 1, multiple):
        if n % d == 0:
            best = d
    return best


def default_blocks(m: int, k: int, n_packed: int) -> BlockSizes:
    return BlockSizes(block_m=m if m <= 128 else _divisor(m, 256, 8) or m,
                      block_n=_divisor(n_packed, 512, 128) or n_packed,
                      block_k=_divisor(k, 1024, 128) or k)


def supported(m: int, k: int, n: int, packing: str, groups: int, blocks: BlockSizes | None = None) -> str:
    if packing not in SUPPORTED_PACKINGS:
        return f"packing {packing} has no TPU kernel"
    n_packed = n // 2 if packing == "u4x2" else n
    b = blocks or default_blocks(m, k, n_packed)
    if n_packed % b.block_n or (b.block_n % 128 and b.block_n != n_packed):
        return f"column tile {b.block_n} must divide {n_packed} and be a multiple of 128"
    step = k // groups if groups > 1 else b.block_k
    if k % step or (step % 128 and step != k):
        return f"row step {step} must divide K={k} and be a multiple of 128"
    if m % b.block_m:
        return f"row tile {b.block_m} must divide M={m}"
    return ""


def _kernel(x_ref, q_ref, *refs, halves, has_zeros, offset, n_steps):
    s_refs = refs[:halves]
    m_refs = refs[halves: 2 * halves] if has_zeros else ()
    rest = refs[(2 if has_zeros else 1) * halves:]
    o_refs, acc_refs = rest[:halves], rest[halves:]
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        for a in acc_refs:
            a[...] = jnp.zeros(a.shape, a.dtype)

    x = x_ref[...]
    qb = q_ref[...].astype(jnp.int32)
    parts = [qb & 0xF, qb >> 4] if halves == 2 else [qb]
    xs = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) if has_zeros else None
    for h in range(halves):
        w = (parts[h] - offset) if offset else parts[h]
        d = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        # One scale per column is the one-group case: s * sum(d) == sum(s * d).
        d = d * s_refs[h][0].astype(jnp.float32)
        if has_zeros:
            d = d + xs * m_refs[h][0].astype(jnp.float32)
        acc_refs[h][...] += d

    @pl.when(kk == n_steps - 1)
    def _done():
        for h in range(halves):
            o_refs[h][...] = acc_refs[h][...].astype(o_refs[h].dtype)


def qmatmul(x, q, scales, zeros=None, *, bits: int, packing: str, n: int, out_dtype=None,
            blocks: BlockSizes | None = None, interpret: bool = False):
    """x [M, K] @ W [K, N]; `interpret=True` runs Pallas' TPU interpreter (CPU tests)."""
    from kernels.qmatmul.reference import code_offset

    m, k = x.shape
    out_dtype = out_dtype or x.dtype
    groups = scales.shape[0]
    if scales.shape[1] == 1 and n > 1:
        scales = jnp.broadcast_to(scales, (groups, n))
        zeros = None if zeros is None else jnp.broadcast_to(zeros, (groups, n))
    halves = 2 if packing == "u4x2" else 1
    n_packed = n // halves
    b = blocks or default_blocks(m, k, n_packed)
    why = supported(m, k, n, packing, groups, b)
    if why:
        raise ValueError(f"qmatmul TPU kernel: {why}")
    grouped = groups > 1
    step = k // groups if grouped else b.block_k
    n_steps = k // step
    nb = n_packed // b.block_n
    grid = (m // b.block_m, nb, n_steps)
    side_map = (lambda h: (lambda i, j, kk: (kk, 0, j + h * nb))) if grouped else \
        (lambda h: (lambda i, j, kk: (0, 0, j + h * nb)))
    side_specs = [pl.BlockSpec((1, 1, b.block_n), side_map(h)) for h in range(halves)]
    side_args = [scales[:, None, :]] * halves
    if zeros is not None:
        side_specs = side_specs * 2
        side_args += [zeros[:, None, :]] * halves
    kernel = functools.partial(_kernel, halves=halves, has_zeros=zeros is not None,
                               offset=code_offset(packing, bits, zeros is not None), n_steps=n_steps)
    outs = pl.pallas_call(
        kernel, grid=grid,
        in_specs=[pl.BlockSpec((b.block_m, step), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((step, b.block_n), lambda i, j, kk: (kk, j)), *side_specs],
        out_specs=[pl.BlockSpec((b.block_m, b.block_n), lambda i, j, kk: (i, j))] * halves,
        out_shape=[jax.ShapeDtypeStruct((m, n_packed), out_dtype)] * halves,
        scratch_shapes=[pltpu.VMEM((b.block_m, b.block_n), jnp.float32)] * halves,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name=f"qmatmul_{packing}",
    )(x, q, *side_args)
    return outs[0] if halves == 1 else jnp.concatenate(outs, axis=-1)
