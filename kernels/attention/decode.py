"""Decode attention (flash-decoding): a few query tokens against a long KV cache.

The grouped query heads of one KV head and the Tq query tokens become the rows of one tile
(g x Tq rows share every K/V load), the cache is split along its length into independent
programs so that a batch of short queries still fills the chip, and the per-split partial
results (normalised output + log-sum-exp) are merged in XLA. Only blocks below each sequence's
kv_length (and, causally, its query slots) are read: the cost follows the real lengths, not
the cache's capacity.

Differentiation (rare at decode time) falls back to the reference's VJP.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.attention import common, reference
from kernels.attention.common import next_pow2

MAX_DECODE_ROWS = 64  # g x Tq above this is better served by the flash (prefill) kernels


def _backend(name: str):
    if name == "triton":
        from kernels.attention import gpu_triton as mod
    elif name == "tpu":
        from kernels.attention import tpu as mod
    else:
        raise ValueError(f"unknown decode backend {name!r} (triton, tpu)")
    return mod


def _pick_block_k(tk: int, want: int, minimum: int) -> int | None:
    """Largest power of two <= want dividing tk (so the cache is never copied to pad it)."""
    b = next_pow2(want)
    while b >= minimum:
        if tk % b == 0:
            return b
        b //= 2
    return None


def _decode_forward(q, k, v, q_positions, kv_lengths, q_seg, kv_seg, *, cfg):
    backend, causal, window, softcap, scale, blocks, interpret = cfg
    mod = _backend(backend)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    rows = g * tq
    m_rows = max(16, next_pow2(rows)) if backend == "triton" else max(8, -(-rows // 8) * 8)
    # Row r = (group head gi, token t) = gi * Tq + t, so head hkv * g + gi keeps the reference's order.
    qr = q.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rows, d)
    qr = common.pad_axis(qr, 2, m_rows)
    rpos = common.pad_axis(jnp.tile(q_positions, (1, g)), 1, m_rows, "edge")
    rseg = None if q_seg is None else common.pad_axis(jnp.tile(q_seg, (1, g)), 1, m_rows, "edge")
    kvlen = jnp.clip(kv_lengths, 0, tk)
    minimum = 16 if backend == "triton" else 128
    bk = _pick_block_k(tk, blocks.block_k, minimum)
    if bk is None:  # odd cache length: pad once (a copy; caches from init_kv_cache never need it)
        bk = min(next_pow2(blocks.block_k), max(minimum, next_pow2(tk)))
        tk_p = -(-tk // bk) * bk
        k, v = common.pad_axis(k, 1, tk_p), common.pad_axis(v, 1, tk_p)
        kv_seg = None if kv_seg is None else common.pad_axis(kv_seg, 1, tk_p)
    st = mod._Static(causal=causal, window=window, softcap=softcap, scale=scale, blocks=None, interpret=interpret,
                     **({"seg": q_seg is not None} if backend == "tpu" else {}))
    if backend == "tpu":  # the key-block range goes in as scalar prefetch (the Triton kernel computes its own)
        lo, hi = common.kv_block_range(rpos, kvlen, m_rows, bk, k.shape[1] // bk, causal=causal, window=window)
        o_parts, lse_parts = mod.decode_partials(qr, k, v, rpos, kvlen, rseg, kv_seg, lo[:, 0], hi[:, 0], st=st,
                                                 blocks=blocks, block_k=bk)
    else:
        o_parts, lse_parts = mod.decode_partials(qr, k, v, rpos, kvlen, rseg, kv_seg, st=st, blocks=blocks,
                                                 block_k=bk)
    o, lse = common.combine_splits(o_parts, lse_parts)  # [B, Hkv, M, D], [B, Hkv, M]
    o = o[:, :, :rows].reshape(b, hkv, g, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, d)
    lse = lse[:, :, :rows].reshape(b, hq, tq)
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _decode(q, k, v, q_positions, kv_lengths, q_seg, kv_seg, cfg):
    return _decode_forward(q, k, v, q_positions, kv_lengths, q_seg, kv_seg, cfg=cfg)


def _decode_fwd(q, k, v, q_positions, kv_lengths, q_seg, kv_seg, cfg):
    out = _decode_forward(q, k, v, q_positions, kv_lengths, q_seg, kv_seg, cfg=cfg)
    return out, (q, k, v, q_positions, kv_lengths, q_seg, kv_seg)


def _decode_bwd(cfg, res, cts):
    q, k, v, q_positions, kv_lengths, q_seg, kv_seg = res
    _, causal, window, softcap, scale, _, _ = cfg
    seg = None if q_seg is None else (q_seg, kv_seg)
    fn = functools.partial(reference.attention, q_positions=q_positions, kv_lengths=kv_lengths, causal=causal,
                           window=window, segment_ids=seg, softcap=softcap, scale=scale, return_lse=True)
    _, vjp = jax.vjp(fn, q, k, v)
    return (*vjp(cts), None, None, None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(q, k, v, *, q_positions, kv_lengths, causal=True, window=None, segment_ids=None, softcap=None,
                     scale=None, mask=None, return_lse=False, backend: str = "triton", block_sizes=None,
                     interpret: bool = False):
    """`reference.attention` for few queries (Tq x group <= MAX_DECODE_ROWS) against a KV cache."""
    common.check(q, k, v, window=window, softcap=softcap, mask=mask)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if (hq // hkv) * tq > MAX_DECODE_ROWS:
        raise common.Unsupported(f"decode attention serves (q heads per kv head) x Tq <= {MAX_DECODE_ROWS}, got "
                                 f"{hq // hkv} x {tq}; use the flash kernel")
    mod = _backend(backend)
    blocks = block_sizes or mod.DecodeBlockSizes()
    q_seg, kv_seg = common.split_segments(segment_ids, tq, tk)
    cfg = (backend, bool(causal), None if window is None else int(window),
           None if softcap is None else float(softcap), float(d**-0.5 if scale is None else scale), blocks,
           bool(interpret))
    qpos = common.positions(q_positions, b, tq)
    kvl = common.lengths(kv_lengths, b, tk)
    o, lse = _decode(q, k, v, qpos, kvl, q_seg, kv_seg, cfg)
    return (o, lse) if return_lse else o
