"""Ternary (BitNet b1.58) weights: format and the XLA reference matmul.

A ternary matrix W [K, N] (K contracted) is t * s with t in {-1, 0, +1} and one fp32 scale s
per tensor (BitNet b1.58's absmean: s = mean |W|) or per output column. Codes c = t + 1 in
{0, 1, 2} are packed four to a byte along N, in quarters (the "u2x4" layout of
`kernels.qmatmul.reference`): byte [k, j] holds columns j, j + N/4, j + 2N/4, j + 3N/4 in
bits 0-1, 2-3, 4-5, 6-7, so a kernel tile of packed columns unpacks into four whole output
tiles. 2 bits a weight (the 1.58-bit entropy rounded up to what addresses cheaply).

Activations are int8, one absmax scale per row (token): y = (xq @ t) * sx * s, where the
int8 x ternary product accumulates exactly in int32 (|sum| <= 127 K).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.qmatmul import reference as qref

PACKING = "u2x4"
PER_BYTE = 4


def pack(t):
    """Ternary values [..., K, N] (any int or float dtype holding -1, 0, 1) -> uint8 [..., K, N/4]."""
    xp = np if isinstance(t, np.ndarray) else jnp
    if t.shape[-1] % PER_BYTE:
        raise ValueError(f"ternary packing puts {PER_BYTE} columns in a byte; N={t.shape[-1]} does not divide")
    return qref.pack(t.astype(xp.int32) + 1, PACKING)


def unpack(packed, n: int | None = None):
    """uint8 [..., K, N/4] -> int8 ternary values [..., K, N]."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    n = packed.shape[-1] * PER_BYTE if n is None else n
    if n != packed.shape[-1] * PER_BYTE:
        raise ValueError(f"packed ternary of {packed.shape[-1]} bytes a row holds {packed.shape[-1] * PER_BYTE} "
                         f"columns, not {n}")
    return (qref.unpack(packed, PACKING, n) - 1).astype(xp.int8)


def absmean_ternary(w, axis=None, eps: float = 1e-5):
    """BitNet b1.58 weight quantization: s = mean|W| (over `axis`; None: the whole tensor),
    t = clip(round(W / s), -1, 1). Returns (t int8, s fp32 with kept dims)."""
    wf = w.astype(jnp.float32)
    s = jnp.maximum(jnp.mean(jnp.abs(wf), axis=axis, keepdims=True), eps)
    t = jnp.clip(jnp.round(wf / s), -1, 1).astype(jnp.int8)
    return t, s


def quantize_rows_int8(x):
    """Per-row absmax int8 of activations (the same grid as W8A8): (xq int8, sx fp32 [..., 1])."""
    return qref.quantize_rows_int8(x)


def ternary_matmul(xq, sx, packed, sw, *, n: int, out_dtype=jnp.float32):
    """(xq int8 [..., K] * sx [..., 1]) @ (unpack(packed) [K, N] * sw [1, N] or [1, 1]), int32 accumulation."""
    t = unpack(packed, n)
    acc = jax.lax.dot_general(xq, t, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * sx.astype(jnp.float32) * sw.astype(jnp.float32)).astype(out_dtype)


def linear(x, packed, sw, *, n: int, out_dtype=None):
    """BitLinear at inference: int8 per-token activations x ternary weights."""
    xq, sx = quantize_rows_int8(x)
    return ternary_matmul(xq, sx, packed, sw, n=n, out_dtype=out_dtype or x.dtype)


def int8_matmul_unpacked(xq, sx, t, sw, out_dtype=jnp.bfloat16):
    """The same product with the ternary values stored unpacked as int8 (a baseline for benchmarks)."""
    acc = jax.lax.dot_general(xq, t, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * sx.astype(jnp.float32) * sw.astype(jnp.float32)).astype(out_dtype)
