"""Pallas (Triton) kernels for weight-only quantized matmuls (W8A16, W4A16) and W8A8.

Decode is memory-bound: the kernel reads each packed weight byte once, converts codes to the
activation dtype in registers and applies the group scale *after* the dot of one group
(exact: codes are small integers, exact in bf16), so the dequantized matrix never exists.

    y[:, n] = sum_g  s[g, n] * (x[:, g] . c[g, n])  +  m[g, n] * sum(x[:, g])

One program computes a [block_m, block_n] tile of packed columns (both nibble halves of
"u4x2": two output tiles) over K / k_splits rows; with k_splits > 1 the partial sums (fp32)
are added by XLA. Small M (decode, M = 1..16) runs in one 16-row tile (the smallest tensor
core shape; rows past M are masked, neither read nor written) and splits K so that enough
programs keep the memory system busy.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUPPORTED_PACKINGS = ("i8", "u8", "u4x2")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_m: int = 16
    block_n: int = 64  # packed columns per program
    block_k: int = 128  # rows per step when there is one scale per column (per channel)
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def default_blocks(m: int, k: int, n_packed: int, groups: int, sm_count: int = 132) -> BlockSizes:
    """Decode (m <= 16): small tiles, K split until ~2 programs per SM; prefill: larger tiles."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    block_n = _largest_pow2_divisor(n_packed, 128 if m <= 16 else 64)
    block_k = _largest_pow2_divisor(k, 256 if m <= 16 else 64)
    m_blocks = -(-m // block_m)
    programs = m_blocks * (n_packed // block_n)
    steps = groups if groups > 1 else k // block_k
    k_splits = 1
    while programs * k_splits < 2 * sm_count and steps % (k_splits * 2) == 0 and steps // (k_splits * 2) >= 2:
        k_splits *= 2
    return BlockSizes(block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits,
                      num_warps=4, num_stages=3 if m <= 16 else 2)


def supported(m: int, k: int, n: int, packing: str, groups: int, x_dtype, blocks: BlockSizes | None = None) -> str:
    """'' if the kernel runs this problem, else why not (callers fall back to XLA)."""
    if packing not in SUPPORTED_PACKINGS:
        return f"packing {packing} has no GPU kernel"
    if jnp.dtype(x_dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"activations of dtype {x_dtype}"
    n_packed = n // 2 if packing == "u4x2" else n
    b = blocks or default_blocks(m, k, n_packed, groups)
    if not _pow2(b.block_n) or b.block_n < 16 or n_packed % b.block_n:
        return f"no power-of-two column tile >= 16 divides {n_packed}"
    step = k // groups if groups > 1 else b.block_k
    if not _pow2(step) or step < 16 or k % step:
        return f"row step {step} (group size or block_k) is not a power of two >= 16 dividing K={k}"
    if (k // step) % b.k_splits:
        return f"k_splits={b.k_splits} does not divide the {k // step} row steps"
    return ""


def _kernel(x_ref, q_ref, *refs, n_steps, step, halves, grouped, has_zeros, offset, precision, m_total):
    ns = halves
    s_refs = refs[:ns]
    m_refs = refs[ns: 2 * ns] if has_zeros else ()
    o_refs = refs[(2 if has_zeros else 1) * ns:]
    bm, bn = x_ref.shape[0], q_ref.shape[1]
    cdt = x_ref.dtype
    # Rows past M (decode: M = 1 in a 16-row tile) are masked: read as 0, never written.
    rows = (pl.program_id(0) * bm + jnp.arange(bm, dtype=jnp.int32) < m_total)[:, None]

    def weights(qb):
        parts = [qb & 0xF, qb >> 4] if halves == 2 else [qb]
        out = []
        for p in parts:
            if offset:
                p = p.astype(jnp.int32) - offset
            out.append(p.astype(cdt))
        return out

    def body(t, carry):
        accs, xsum = carry
        x = plgpu.load(x_ref.at[:, pl.ds(t * step, step)], mask=rows, other=0.0)
        ws = weights(q_ref[pl.ds(t * step, step), :])
        xs = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) if has_zeros else None
        new = []
        for h in range(halves):
            d = jnp.dot(x, ws[h], preferred_element_type=jnp.float32, precision=precision)
            if grouped:
                d = d * s_refs[h][pl.ds(t, 1), :].astype(jnp.float32)
                if has_zeros:
                    d = d + xs * m_refs[h][pl.ds(t, 1), :].astype(jnp.float32)
            new.append(accs[h] + d)
        if has_zeros and not grouped:
            xsum = xsum + xs
        return tuple(new), xsum

    zero = jnp.zeros((bm, bn), jnp.float32)
    accs, xsum = jax.lax.fori_loop(0, n_steps, body, ((zero,) * halves, jnp.zeros((bm, 1), jnp.float32)))
    for h in range(halves):
        acc = accs[h]
        if not grouped:
            acc = acc * s_refs[h][...].astype(jnp.float32)
            if has_zeros:
                acc = acc + xsum * m_refs[h][...].astype(jnp.float32)
        plgpu.store(o_refs[h].at[...], acc.astype(o_refs[h].dtype), mask=rows)


def qmatmul(x, q, scales, zeros=None, *, bits: int, packing: str, n: int, out_dtype=None,
            blocks: BlockSizes | None = None, interpret: bool = False):
    """x [M, K] @ W [K, N] for W stored as in `kernels.qmatmul.reference` ("i8", "u8", "u4x2")."""
    from kernels.qmatmul.reference import code_offset

    m, k = x.shape
    out_dtype = out_dtype or x.dtype
    groups = scales.shape[0]
    if scales.shape[1] == 1 and n > 1:  # one scale per tensor
        scales = jnp.broadcast_to(scales, (groups, n))
        zeros = None if zeros is None else jnp.broadcast_to(zeros, (groups, n))
    halves = 2 if packing == "u4x2" else 1
    n_packed = n // halves
    b = blocks or default_blocks(m, k, n_packed, groups)
    why = supported(m, k, n, packing, groups, x.dtype, b)
    if why:
        raise ValueError(f"qmatmul GPU kernel: {why}")
    grouped = groups > 1
    step = k // groups if grouped else b.block_k
    steps = k // step
    splits = b.k_splits
    k_split = k // splits
    nb = n_packed // b.block_n
    grid = (-(-m // b.block_m), nb, splits)

    x_spec = pl.BlockSpec((b.block_m, k_split), lambda i, j, s: (i, s))
    q_spec = pl.BlockSpec((k_split, b.block_n), lambda i, j, s: (s, j))
    if grouped:
        g_split = groups // splits
        side = [pl.BlockSpec((g_split, b.block_n), (lambda i, j, s, h=h: (s, j + h * nb))) for h in range(halves)]
    else:
        side = [pl.BlockSpec((1, b.block_n), (lambda i, j, s, h=h: (0, j + h * nb))) for h in range(halves)]
    side_args = [scales] * halves + ([zeros] * halves if zeros is not None else [])
    side_specs = side * (2 if zeros is not None else 1)
    if splits > 1:
        out_shape = [jax.ShapeDtypeStruct((splits, m, n_packed), jnp.float32)] * halves
        out_specs = [pl.BlockSpec((None, b.block_m, b.block_n), lambda i, j, s: (s, i, j))] * halves
    else:
        out_shape = [jax.ShapeDtypeStruct((m, n_packed), out_dtype)] * halves
        out_specs = [pl.BlockSpec((b.block_m, b.block_n), lambda i, j, s: (i, j))] * halves
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, n_steps=steps // splits, step=step, halves=halves, grouped=grouped, has_zeros=zeros is not None,
        offset=code_offset(packing, bits, zeros is not None), precision=precision, m_total=m)
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=[x_spec, q_spec, *side_specs], out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
        interpret=interpret, name=f"qmatmul_{packing}",
    )(x, q, *side_args)
    if splits > 1:
        outs = [o.sum(axis=0) for o in outs]
    y = outs[0] if halves == 1 else jnp.concatenate(outs, axis=-1)
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------- W8A8 (int8 x int8)
def _int8_kernel(xq_ref, sx_ref, wq_ref, sw_ref, o_ref, *, n_steps, step):
    bm, bn = xq_ref.shape[0], wq_ref.shape[1]

    def body(t, acc):
        a = xq_ref[:, pl.ds(t * step, step)]
        w = wq_ref[pl.ds(t * step, step), :]
        return acc + jnp.dot(a, w, preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.int32))
    y = acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def int8_supported(m: int, k: int, n: int) -> str:
    if _largest_pow2_divisor(n, 128) < 16:
        return f"no power-of-two column tile >= 16 divides N={n}"
    if _largest_pow2_divisor(k, 128) < 32:
        return f"no power-of-two row step >= 32 divides K={k}"
    return ""


def int8_matmul(xq, sx, wq, sw, *, out_dtype=jnp.float32, interpret: bool = False):
    """(xq int8 [M, K] * sx fp32 [M, 1]) @ (wq int8 [K, N] * sw [1, N]), int32 accumulation."""
    m, k = xq.shape
    n = wq.shape[1]
    why = int8_supported(m, k, n)
    if why:
        raise ValueError(f"int8 GPU kernel: {why}")
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = _largest_pow2_divisor(n, 128 if m <= 16 else 64)
    step = _largest_pow2_divisor(k, 128)
    m_pad = -(-m // bm) * bm
    if m_pad != m:
        xq = jnp.pad(xq, ((0, m_pad - m), (0, 0)))
        sx = jnp.pad(sx, ((0, m_pad - m), (0, 0)))
    y = pl.pallas_call(
        functools.partial(_int8_kernel, n_steps=k // step, step=step),
        grid=(m_pad // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
                  pl.BlockSpec((k, bn), lambda i, j: (0, j)), pl.BlockSpec((1, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret, name="int8_matmul",
    )(xq, sx.astype(jnp.float32), wq, sw)
    return y[:m]
