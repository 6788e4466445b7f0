"""Pure-jnp attention: the definition every attention kernel is tested against.

Shapes follow `jax.nn.dot_product_attention`: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], with Hkv
dividing Hq (grouped-query attention). Masking is expressed in *slot* coordinates: key j sits
at slot j; query i sits at slot `q_positions[b, i]` (None: slot i, the usual training /
prefill layout, which lets kernels that only know that layout, such as cuDNN's, serve the
call); `kv_lengths=None` means all Tk keys are valid. Softmax runs in fp32 whatever the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_positions(batch: int, tq: int) -> jax.Array:
    """The slots of `q_positions=None`: query i at slot i."""
    return jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32)[None], (batch, tq))


def build_mask(
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    tk: int,
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids=None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, 1 or Hq, Tq, Tk]: True where a query may attend to a key."""
    kv_pos = jnp.arange(tk, dtype=jnp.int32)[None, None, :]  # [1, 1, Tk]
    qp = q_positions[:, :, None]  # [B, Tq, 1]
    allowed = kv_pos < kv_lengths[:, None, None]
    if causal:
        allowed = allowed & (kv_pos <= qp)
    if window is not None:
        # Mistral/HF convention: a query sees the `window` most recent keys, itself included.
        allowed = allowed & (qp - kv_pos < window)
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        allowed = allowed & (q_seg[:, :, None] == kv_seg[:, None, :])
    allowed = jnp.broadcast_to(allowed, (qp.shape[0], qp.shape[1], tk))[:, None]  # [B, 1, Tq, Tk]
    if mask is not None:
        allowed = allowed & mask.astype(bool)
    return allowed


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None,
    kv_lengths: jax.Array | None,
    causal: bool = True,
    window: int | None = None,
    segment_ids=None,
    softcap: float | None = None,
    scale: float | None = None,
    mask: jax.Array | None = None,
    return_lse: bool = False,
):
    """Reference attention. Returns out [B, Tq, Hq, D] (q's dtype), and lse [B, Hq, Tq] if asked.

    Rows with no allowed key (padding) return zeros and lse = -inf rather than NaN.
    """
    b, tq, hq, d = q.shape
    _, tk, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    g = hq // hkv
    if q_positions is None:
        q_positions = default_positions(b, tq)
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), tk, jnp.int32)
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, tq, hkv, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if softcap is not None:
        logits = jnp.float32(softcap) * jnp.tanh(logits / jnp.float32(softcap))
    allowed = build_mask(
        q_positions, kv_lengths, tk, causal=causal, window=window, segment_ids=segment_ids, mask=mask
    )  # [B, 1|Hq, Tq, Tk]
    allowed = allowed.reshape(b, -1, 1, tq, tk) if allowed.shape[1] == 1 else allowed.reshape(b, hkv, g, tq, tk)
    logits = jnp.where(allowed, logits, MASK_VALUE)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", (p / safe).astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out.reshape(b, tq, hq, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(denom[..., 0] == 0.0, -jnp.inf, m[..., 0] + jnp.log(safe[..., 0]))
    return out, lse.reshape(b, hq, tq)
