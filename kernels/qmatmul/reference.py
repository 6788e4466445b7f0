"""Quantized weight formats and the XLA reference: unpack, dequantize, then one dot.

Every quantized matrix is stored in the "[K, N]" orientation: K is the contraction axis (the
`in` axis of a linear weight, the `dim` axis of an embedding table), N the output axis.

    codes   the integer code of each weight, packed along N by `packing` (below)
    scales  [G, N] (G = K // group_size groups along K; [1, 1] for one scale per tensor)
    zeros   [G, N] or None: a float offset per group (llama.cpp's Q4_1 `m`)

    value = scales * code + zeros          (asymmetric: unsigned codes, `zeros` given)
    value = scales * (code - 2**(bits-1))  (symmetric in an unsigned container, no zeros)
    value = scales * code                  ("i8": signed int8 codes; "f8e4m3": fp8 values)

Sub-byte codes are packed along N in halves (quarters, eighths) so that a kernel tile of
packed columns j..j+bn unpacks into whole tiles of output columns, never an interleave:
byte [k, j] of "u4x2" holds code [k, j] in its low nibble and code [k, j + N/2] in its high one.
"u3" stores 3-bit codes as a 2-bit plane ("u2x4", N/4 columns) followed by a 1-bit plane
("u1x8", N/8 columns): 3 bits a weight, as llama.cpp's Q3_K splits its codes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# packing -> (bits per code, codes per byte); None for whole-byte formats
PACKINGS = {
    "i8": (8, 1), "u8": (8, 1), "f8e4m3": (8, 1),
    "u4x2": (4, 2), "u2x4": (2, 4), "u1x8": (1, 8), "u3": (3, None),
}


def packing_for(bits: int, symmetric: bool) -> str:
    if bits == 8:
        return "i8" if symmetric else "u8"
    return {4: "u4x2", 2: "u2x4", 3: "u3", 1: "u1x8"}[bits]


def packed_columns(packing: str, n: int) -> int:
    """Stored columns for N logical columns; N must divide evenly (checked by callers)."""
    if packing == "u3":
        return n // 4 + n // 8
    per = PACKINGS[packing][1]
    return n // per


def column_multiple(packing: str) -> int:
    """N must be a multiple of this for `packing`."""
    return 8 if packing == "u3" else PACKINGS[packing][1]


def _pack_plane(codes, bits: int, xp):
    per = 8 // bits
    n = codes.shape[-1]
    parts = codes.reshape(*codes.shape[:-1], per, n // per).astype(xp.uint8)
    out = parts[..., 0, :]
    for t in range(1, per):
        out = out | (parts[..., t, :] << (t * bits))
    return out


def _unpack_plane(packed, bits: int, xp):
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (t * bits)) & mask for t in range(per)]
    return xp.concatenate(parts, axis=-1)


def pack(codes, packing: str):
    """Unsigned (or "i8" signed) integer codes [..., K, N] -> stored array. Works on numpy and jax."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    if packing == "i8":
        return codes.astype(xp.int8)
    if packing == "u8":
        return codes.astype(xp.uint8)
    if packing == "u3":
        return xp.concatenate([_pack_plane(codes & 3, 2, xp), _pack_plane(codes >> 2, 1, xp)], axis=-1)
    return _pack_plane(codes, PACKINGS[packing][0], xp)


def unpack(stored, packing: str, n: int):
    """Stored array -> integer codes [..., K, N] (int32; fp8 values stay fp8)."""
    xp = np if isinstance(stored, np.ndarray) else jnp
    if packing == "f8e4m3":
        return stored
    if packing in ("i8", "u8"):
        return stored.astype(xp.int32)
    if packing == "u3":
        lo = _unpack_plane(stored[..., : n // 4], 2, xp)
        hi = _unpack_plane(stored[..., n // 4:], 1, xp)
        return (lo.astype(xp.int32) | (hi.astype(xp.int32) << 2))
    return _unpack_plane(stored, PACKINGS[packing][0], xp).astype(xp.int32)


def code_offset(packing: str, bits: int, has_zeros: bool) -> int:
    """Subtracted from unsigned codes of symmetric formats."""
    if has_zeros or packing in ("i8", "f8e4m3"):
        return 0
    return 1 << (bits - 1)


def dequantize(q, scales, zeros=None, *, bits: int, packing: str, n: int, dtype=jnp.float32):
    """[K, N] values in `dtype`, computed in fp32 as (scale * code) + zero (GGUF's order, so
    that re-quantized GGUF blocks come back bit-exact)."""
    codes = unpack(q, packing, n).astype(jnp.float32)
    off = code_offset(packing, bits, zeros is not None)
    if off:
        codes = codes - jnp.float32(off)
    k = codes.shape[0]
    g_count = scales.shape[0]
    v = codes.reshape(g_count, k // g_count, n) * scales.astype(jnp.float32)[:, None, :]
    if zeros is not None:
        v = v + zeros.astype(jnp.float32)[:, None, :]
    return v.reshape(k, n).astype(dtype)


def qmatmul(x, q, scales, zeros=None, *, bits: int, packing: str, n: int, out_dtype=None):
    """x [..., K] @ dequantize(...) [K, N], accumulated in fp32, in `out_dtype` (default x's)."""
    w = dequantize(q, scales, zeros, bits=bits, packing=packing, n=n, dtype=x.dtype)
    y = jnp.einsum("...k,kn->...n", x, w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def quantize_rows_int8(x):
    """Per-row (per-token) symmetric int8 of x [..., K]: (codes int8, scales fp32 [..., 1])."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8)
    return codes, scale


def int8_matmul(xq, sx, wq, sw, *, out_dtype=jnp.float32):
    """(xq int8 [..., K] * sx [..., 1]) @ (wq int8 [K, N] * sw [1, N]) with int32 accumulation."""
    acc = jax.lax.dot_general(xq, wq, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * sx.astype(jnp.float32) * sw.astype(jnp.float32)).astype(out_dtype)
