"""What every attention kernel shares: argument checks, padding, block-range tables, the mask.

All kernels implement `reference.attention`'s semantics (slot coordinates: key j sits at slot j,
query i at slot `q_positions[b, i]`). They differ in how they walk the blocks, so the pieces
here are backend-neutral jnp: the host-side tables are computed by XLA before the kernel runs,
and `allowed` is traced inside kernel bodies (Triton, Mosaic TPU) as well as in XLA.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite so that (masked - masked) stays 0, never inf - inf; masked terms are zeroed explicitly.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


class Unsupported(ValueError):
    """A kernel cannot serve these arguments (another implementation may); the message names the argument."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call, after normalisation."""

    batch: int
    tq: int
    tk: int
    hq: int
    hkv: int
    head_dim: int
    dtype: jnp.dtype
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    has_segments: bool

    @property
    def group(self) -> int:
        return self.hq // self.hkv


def check(q, k, v, *, window=None, softcap=None, mask=None, head_dims=(32, 64, 128, 256)) -> None:
    """Raise `Unsupported` (a ValueError) naming the first argument a Pallas kernel cannot take."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise Unsupported(f"q, k, v must be 4-D [B, T, H, D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape != v.shape:
        raise Unsupported(f"k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise Unsupported(f"q batch {q.shape[0]} != k batch {k.shape[0]}")
    if q.shape[2] % k.shape[2]:
        raise Unsupported(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
    if q.shape[3] != k.shape[3]:
        raise Unsupported(f"q head_dim {q.shape[3]} != k head_dim {k.shape[3]}")
    if q.shape[3] not in head_dims:
        raise Unsupported(f"head_dim {q.shape[3]} is not supported by this kernel (supported: {head_dims})")
    if not (q.dtype == k.dtype == v.dtype):
        raise Unsupported(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype} (cast them to one dtype)")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise Unsupported(f"dtype {q.dtype} is not supported (bfloat16, float16, float32)")
    if window is not None and window < 1:
        raise Unsupported(f"window must be >= 1, got {window}")
    if softcap is not None and softcap <= 0:
        raise Unsupported(f"softcap must be > 0, got {softcap}")
    if mask is not None:
        raise Unsupported("mask (an explicit [B, 1|Hq, Tq, Tk] mask) is served by the xla path only")


def split_segments(segment_ids, tq: int, tk: int):
    """(q_seg [B, Tq], kv_seg [B, Tk]) int32, or (None, None)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if tq != tk:
            raise Unsupported("segment_ids as one array needs Tq == Tk; pass a (q_seg, kv_seg) pair")
        q_seg = kv_seg = segment_ids
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def positions(q_positions, batch: int, tq: int):
    """int32 [B, Tq] query slots (None: query i at slot i)."""
    if q_positions is None:
        return jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32)[None], (batch, tq))
    return jnp.broadcast_to(q_positions, (batch, tq)).astype(jnp.int32)


def lengths(kv_lengths, batch: int, tk: int):
    """int32 [B] valid key counts clipped to [0, Tk] (None: all Tk keys)."""
    if kv_lengths is None:
        return jnp.full((batch,), tk, jnp.int32)
    return jnp.clip(jnp.broadcast_to(kv_lengths, (batch,)).astype(jnp.int32), 0, tk)


def pad_axis(x, axis: int, size: int, mode: str = "constant"):
    """Pad `axis` of x up to `size` (no copy when it already has that size)."""
    n = x.shape[axis]
    if n == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    return jnp.pad(x, widths, mode=mode)


def allowed(qpos, kpos, kv_len, *, causal: bool, window, qseg=None, kseg=None):
    """Boolean mask from broadcastable int32 query slots [M, 1] and key slots [1, N]."""
    ok = kpos < kv_len
    if causal:
        ok = ok & (kpos <= qpos)
    if window is not None:
        ok = ok & (qpos - kpos < window)
    if qseg is not None:
        ok = ok & (qseg == kseg)
    return ok


def kv_element_range(q_positions, kv_lengths, block_q: int, *, causal: bool, window):
    """Per (b, q block): [lo, hi) key slots that any query of the block may see. Int32 [B, nq]."""
    b, tq = q_positions.shape
    qp = q_positions.reshape(b, tq // block_q, block_q)
    hi = jnp.broadcast_to(kv_lengths[:, None], qp.shape[:2])
    if causal:
        hi = jnp.minimum(hi, qp.max(-1) + 1)
    lo = jnp.zeros_like(hi)
    if window is not None:
        lo = jnp.maximum(lo, qp.min(-1) - window + 1)
    return lo, jnp.maximum(hi, lo)


def kv_block_range(q_positions, kv_lengths, block_q: int, block_k: int, nk: int, *, causal: bool, window):
    """Per (b, q block): [lo, hi) of key *blocks* to visit (a superset; the mask is applied inside)."""
    lo, hi = kv_element_range(q_positions, kv_lengths, block_q, causal=causal, window=window)
    lo_b = jnp.clip(lo // block_k, 0, nk)
    hi_b = jnp.clip((hi + block_k - 1) // block_k, 0, nk)
    empty = hi <= lo
    return jnp.where(empty, 0, lo_b).astype(jnp.int32), jnp.where(empty, 0, hi_b).astype(jnp.int32)


def q_block_range(q_positions, kv_lengths, block_q: int, block_k: int, nk: int, *, causal: bool, window):
    """Per (b, key block): [lo, hi) of query blocks that see any key of it (the hull; int32 [B, nk])."""
    lo, hi = kv_element_range(q_positions, kv_lengths, block_q, causal=causal, window=window)  # [B, nq]
    k0 = jnp.arange(nk, dtype=jnp.int32)[None, :, None] * block_k  # [1, nk, 1]
    need = (lo[:, None, :] < k0 + block_k) & (hi[:, None, :] > k0) & (hi > lo)[:, None, :]  # [B, nk, nq]
    nq = lo.shape[1]
    idx = jnp.arange(nq, dtype=jnp.int32)
    first = jnp.min(jnp.where(need, idx, nq), axis=-1)
    last = jnp.max(jnp.where(need, idx + 1, 0), axis=-1)
    anyq = last > 0
    return jnp.where(anyq, first, 0).astype(jnp.int32), jnp.where(anyq, last, 0).astype(jnp.int32)


def combine_splits(o_parts, lse_parts):
    """Merge flash-decoding partial results along axis 0 of [S, ...]: o [S, ..., D] normalised per
    split, lse [S, ...] natural log (-inf where a split saw no key). Returns (o fp32, lse)."""
    m = jnp.max(lse_parts, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse_parts), jnp.exp(lse_parts - m_safe[None]), 0.0)
    denom = jnp.sum(w, axis=0)
    safe = jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.sum(w[..., None] * o_parts, axis=0) / safe[..., None]
    lse = jnp.where(denom == 0.0, -jnp.inf, m_safe + jnp.log(safe))
    return o, lse


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, precise: bool = False):
    """fp32-accumulating 2-D matmul usable inside kernels; `precise` asks for true fp32 (no tf32)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    prec = jax.lax.Precision.HIGHEST if precise else None
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)
