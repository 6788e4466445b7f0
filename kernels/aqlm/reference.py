"""AQLM additive codebooks: the stored format and the XLA path (dequantize, then one dot).

A weight W [K, N] (K contracted) is cut into G = K / d vectors of d consecutive K rows per
output column. Each vector is the sum of one entry from each of M codebooks, times the
column's scale:

    W[g*d + i, n] = scales[0, n] * sum_m codebooks[m, codes[m, g, n], i]

    codes      [M, G, N]  uint8 (B <= 8) or uint16 (B <= 16): 2^B entries per codebook
    codebooks  [M, 2^B, d] float16
    scales     [1, N]      float16

2x8 with d = 8: 16 bits of codes per 8 weights = 2 bits per weight, plus 8 KiB of codebooks
per matrix and one scale per column.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_BITS = 16


def code_dtype(bits: int):
    return np.uint8 if bits <= 8 else np.uint16


def check_format(codes_shape, codebooks_shape, scales_shape, bits: int, k: int | None = None,
                 n: int | None = None) -> str:
    """'' if the arrays form a valid AQLM weight, else what is wrong."""
    if not 1 <= int(bits) <= MAX_BITS:
        return f"codebook bits must be in 1..{MAX_BITS}, got {bits}"
    if len(codes_shape) != 3 or len(codebooks_shape) != 3:
        return f"codes must be [M, G, N] and codebooks [M, 2^B, d]; got {tuple(codes_shape)}, {tuple(codebooks_shape)}"
    m, g, nn = codes_shape
    if codebooks_shape[0] != m or codebooks_shape[1] != 2 ** bits:
        return f"codebooks {tuple(codebooks_shape)} do not match {m} codebooks of 2^{bits} entries"
    d = codebooks_shape[2]
    if k is not None and g * d != k:
        return f"{g} groups of {d} weights do not cover K={k}"
    if n is not None and nn != n:
        return f"codes have {nn} columns, expected {n}"
    if tuple(scales_shape) != (1, nn):
        return f"scales are {tuple(scales_shape)}, expected {(1, nn)}"
    return ""


def dequantize(codes, codebooks, scales, dtype=jnp.float32):
    """[K, N] in `dtype` (sums in fp32)."""
    m, g, n = codes.shape
    d = codebooks.shape[2]
    cb = codebooks.astype(jnp.float32)
    idx = codes.astype(jnp.int32)
    # vectors[g, n, :] = sum_m cb[m, codes[m, g, n], :]
    vec = sum(jnp.take(cb[i], idx[i], axis=0) for i in range(m))  # [G, N, d]
    w = jnp.transpose(vec, (0, 2, 1)).reshape(g * d, n) * scales.astype(jnp.float32)
    return w.astype(dtype)


def matmul(x, codes, codebooks, scales, *, out_dtype=None):
    """x [..., K] @ W [K, N]: dequantize in the activation dtype, one dot with fp32 accumulation."""
    out_dtype = out_dtype or x.dtype
    w = dequantize(codes, codebooks, scales, x.dtype)
    y = jnp.einsum("...k,kn->...n", x, w, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    return y.astype(out_dtype)


def lookup_tables(x2, codebooks):
    """x2 [R, K] -> LUT [R, M, G, 2^B] fp32: x_g . codebooks[m, j] for every group and entry.

    y[r, n] = scales[n] * sum_{m, g} LUT[r, m, g, codes[m, g, n]]: the decode kernel's form."""
    r, k = x2.shape
    m, e, d = codebooks.shape
    xg = x2.astype(jnp.float32).reshape(r, k // d, d)
    return jnp.einsum("rgd,med->rmge", xg, codebooks.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def matmul_lut(x2, codes, codebooks, scales, *, out_dtype=None):
    """The lookup-and-accumulate form in XLA (a second reference for the kernel)."""
    lut = lookup_tables(x2, codebooks)  # [R, M, G, E]
    m, g, _ = codes.shape
    idx = codes.astype(jnp.int32)
    rows = jnp.arange(g)[:, None]
    acc = sum(lut[:, i][:, rows, idx[i]].sum(axis=1) for i in range(m))  # [R, N]
    y = acc * scales.astype(jnp.float32)
    return y.astype(out_dtype or x2.dtype)
