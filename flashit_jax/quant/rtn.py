"""Round-to-nearest: group parameters, codes and the QArray they make.

Everything here works on the stored "[K, N]" orientation (K contracted, groups of
`group_size` consecutive rows along K). Asymmetric groups follow llama.cpp's Q4_1: scale
(max - min) / (2^bits - 1) and offset min, both rounded to `scale_dtype` (fp16) *before*
the codes are chosen, so a matrix that already lies on such a grid comes back unchanged.
Symmetric groups use absmax / (2^(bits-1) - 1), codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flashit_jax.nn.qarray import QArray
from kernels.qmatmul import reference as qref

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def group_params(wg, *, bits: int, symmetric: bool, scale_dtype, clip=None):
    """wg [..., g, N] (one group along axis -2) -> (scale, zero or None), each [..., N] fp32 values
    of `scale_dtype`. `clip` [..., N] in (0, 1] shrinks the range (AWQ's clipping search)."""
    if symmetric:
        amax = jnp.max(jnp.abs(wg), axis=-2)
        if clip is not None:
            amax = amax * clip
        s = (amax / (2 ** (bits - 1) - 1)).astype(scale_dtype).astype(jnp.float32)
        return s, None
    lo, hi = jnp.min(wg, axis=-2), jnp.max(wg, axis=-2)
    if clip is not None:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * clip
        lo, hi = jnp.maximum(lo, -amax), jnp.minimum(hi, amax)
    s = ((hi - lo) / (2**bits - 1)).astype(scale_dtype).astype(jnp.float32)
    z = lo.astype(scale_dtype).astype(jnp.float32)
    return s, z


def codes_for(w, s, z, *, bits: int):
    """Codes of w under (s, z); broadcasting. Symmetric codes are signed (offset added at packing)."""
    safe = jnp.where(s == 0, 1.0, s)
    if z is None:
        qmax = 2 ** (bits - 1) - 1
        return jnp.clip(jnp.round(w / safe), -qmax, qmax).astype(jnp.int32)
    return jnp.clip(jnp.round((w - z) / safe), 0, 2**bits - 1).astype(jnp.int32)


def values_for(c, s, z):
    """The grid value of codes c: (s * c) + z, the order `dequantize` uses."""
    v = s * c.astype(jnp.float32)
    return v if z is None else v + z


def stored_codes(codes, *, bits: int, symmetric: bool):
    """Signed symmetric codes -> the unsigned container of sub-byte / u8 packings."""
    if symmetric and bits < 8:
        return codes + (1 << (bits - 1))
    return codes


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype"))
def quantize_groups(w, clip=None, *, bits: int, group_size: int, symmetric: bool, scale_dtype):
    """w [K, N] fp32 -> (codes [K, N] int32 (signed if symmetric), scales [G, N], zeros [G, N] | None)."""
    k, n = w.shape
    wg = w.reshape(k // group_size, group_size, n)
    s, z = group_params(wg, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, clip=clip)
    c = codes_for(wg, s[:, None, :], None if z is None else z[:, None, :], bits=bits)
    return c.reshape(k, n), s, z


def to_qarray(codes, scales, zeros, *, bits: int, group_size: int, symmetric: bool, axis: int, shape, dtype,
              scale_dtype, act=None, threshold: float = 6.0) -> QArray:
    packing = qref.packing_for(bits, symmetric)
    stored = qref.pack(stored_codes(codes, bits=bits, symmetric=symmetric), packing)
    return QArray.create(stored, scales.astype(scale_dtype), None if zeros is None else zeros.astype(scale_dtype),
                         bits=bits, group_size=group_size, axis=axis, shape=shape, dtype=dtype, packing=packing,
                         act=act, threshold=threshold)


def quantize_kn(w, *, bits: int, group_size: int, symmetric: bool, axis: int, shape, dtype,
                scale_dtype=jnp.float16, per_tensor: bool = False, clip=None, act=None,
                threshold: float = 6.0) -> QArray:
    """Round-to-nearest QArray of w [K, N] (stored orientation)."""
    w = jnp.asarray(w, jnp.float32)
    k, n = w.shape
    if per_tensor:
        if not symmetric:
            raise ValueError("per-tensor quantization is symmetric here")
        amax = jnp.max(jnp.abs(w))
        s = (amax / (2 ** (bits - 1) - 1)).astype(scale_dtype).astype(jnp.float32).reshape(1, 1)
        c = codes_for(w, s, None, bits=bits)
        return to_qarray(c, s, None, bits=bits, group_size=k, symmetric=True, axis=axis, shape=shape, dtype=dtype,
                         scale_dtype=scale_dtype, act=act, threshold=threshold)
    c, s, z = quantize_groups(w, clip, bits=bits, group_size=group_size, symmetric=symmetric,
                              scale_dtype=jnp.dtype(scale_dtype))
    return to_qarray(c, s, z, bits=bits, group_size=group_size, symmetric=symmetric, axis=axis, shape=shape,
                     dtype=dtype, scale_dtype=scale_dtype, act=act, threshold=threshold)


def quantize_fp8(w, *, axis: int, shape, dtype) -> QArray:
    """float8 e4m3 values with one fp32 scale per output column (absmax -> 448)."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=0, keepdims=True)
    s = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    q = (w / s).astype(jnp.float8_e4m3fn)
    return QArray.create(q, s, None, bits=8, group_size=w.shape[0], axis=axis, shape=shape, dtype=dtype,
                         packing="f8e4m3")
