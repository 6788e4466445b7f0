"""`attention`: the signature every model calls and every attention kernel implements."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flashit_jax.errors import FlashitError
from kernels.attention import api


def _validate(q, k, v, q_positions, kv_lengths, window, softcap, impl):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise FlashitError(f"attention expects 4-D q/k/v [B, T, H, D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape != v.shape:
        raise FlashitError(f"attention: k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise FlashitError(f"attention: q batch {q.shape[0]} != k/v batch {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise FlashitError(f"attention: head_dim of q ({q.shape[3]}) != head_dim of k/v ({k.shape[3]})")
    if q.shape[2] % k.shape[2]:
        raise FlashitError(f"attention: q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise FlashitError(f"attention: dtype mismatch, q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them to one dtype")
    if window is not None and window < 1:
        raise FlashitError(f"attention: window must be >= 1 (keys a query sees, itself included), got {window}")
    if softcap is not None and softcap <= 0:
        raise FlashitError(f"attention: softcap must be > 0, got {softcap}")
    if q_positions is not None and jnp.shape(q_positions) not in ((q.shape[0], q.shape[1]), (1, q.shape[1])):
        raise FlashitError(f"attention: q_positions must be [B, Tq] = {(q.shape[0], q.shape[1])}, "
                           f"got {jnp.shape(q_positions)}")
    if kv_lengths is not None and jnp.shape(kv_lengths) not in ((q.shape[0],), (), (1,)):
        raise FlashitError(f"attention: kv_lengths must be [B] = ({q.shape[0]},), got {jnp.shape(kv_lengths)}")
    if impl != "auto" and impl not in api.available():
        raise FlashitError(f"attention: unknown impl {impl!r}; known: {api.available()}")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    segment_ids=None,
    softcap: float | None = None,
    scale: float | None = None,
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Multi-head attention with grouped KV heads.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] (as `jax.nn.dot_product_attention`).
    q_positions int32 [B, Tq]: the key slot each query sits at (causal: key j <= position);
      None: query i at slot i (training / prefill without a cache).
    kv_lengths int32 [B]: keys at slots >= length are ignored (cache padding); None: all valid.
    window: sliding window (a query sees the `window` latest keys, itself included).
    segment_ids: int32 [B, T] (or a (q, kv) pair) for packed sequences.
    softcap: logits -> softcap * tanh(logits / softcap). mask: extra bool [B, 1|Hq, Tq, Tk].
    impl: "auto" (fastest that supports the call here) | "xla" | "cudnn" | "pallas" |
      "pallas_triton" | "pallas_mgpu" | "pallas_tpu" (see kernels/attention/api.py).
    """
    _validate(q, k, v, q_positions, kv_lengths, window, softcap, impl)
    kw = dict(q_positions=q_positions, kv_lengths=kv_lengths, causal=causal, window=window,
              segment_ids=segment_ids, softcap=softcap, scale=scale, mask=mask)
    if impl != "auto":
        why = api.supports(impl, q, k, v, **kw)
        if why:
            raise FlashitError(f"attention impl {impl!r} cannot serve this call: {why}")
    return api.attention(q, k, v, impl=impl, **kw)
