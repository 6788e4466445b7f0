"""`attention`: the signature every model calls and every attention kernel implements."""
from __future__ import annotations

import jax

from kernels.attention import api


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
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
    q_positions int32 [B, Tq]: the key slot each query sits at (causal: key j <= position).
    kv_lengths int32 [B]: keys at slots >= length are ignored (cache padding).
    window: sliding window (a query sees the `window` latest keys, itself included).
    segment_ids: int32 [B, T] (or a (q, kv) pair) for packed sequences.
    softcap: logits -> softcap * tanh(logits / softcap). mask: extra bool [B, 1|Hq, Tq, Tk].
    impl: "auto" | "xla" | "cudnn" | a registered kernel name.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-D q/k/v [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    return api.attention(
        q, k, v, impl=impl, q_positions=q_positions, kv_lengths=kv_lengths, causal=causal,
        window=window, segment_ids=segment_ids, softcap=softcap, scale=scale, mask=mask,
    )
