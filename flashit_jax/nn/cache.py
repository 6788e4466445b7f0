"""The key/value cache: a pytree every decoding strategy shares.

Per-layer buffers (layers may differ in KV heads after structured pruning) of shape
[B, max_len, Hkv, D]; slot j of sequence b holds the key of position j. `lengths[b]` counts
the valid slots, so rolling back (speculative decoding) only lowers `lengths`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: list
    v: list
    lengths: jax.Array  # int32 [B]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def update_layer(self, i: int, k: jax.Array, v: jax.Array):
        """Write layer i's new keys/values [B, T, Hkv, D] at slots lengths[b] + t.

        Returns (keys, values) to attend over ([B, max_len, Hkv, D], compute dtype) and the
        layer's new entry for `advance`. Cache variants (e.g. int8) override this pair.
        """
        kc = write_slots(self.k[i], k, self.lengths)
        vc = write_slots(self.v[i], v, self.lengths)
        return kc.astype(k.dtype), vc.astype(v.dtype), (kc, vc)

    def rope_update_layer(self, i: int, q, k, v, positions, inv_freq):
        """A one-token decode step's rotary embedding of q and k and layer i's cache write in one kernel
        (kernels/attention/rope_cache.py), where FLASHIT_JAX_ROPE_KERNEL turns it on and it applies:
        (rotated q, keys, values, entry) as `update_layer` gives them; else None (the caller rotates, then
        calls `update_layer`). Cache variants that transform what they store (int8) return None."""
        from kernels import under_split_mesh
        from kernels.attention import rope_cache

        mode = rope_cache.mode()
        if not mode or type(self) is not KVCache or under_split_mesh():
            return None
        if rope_cache.supported(q, k, v, self.k[i], inv_freq):
            return None
        qr, kc, vc = rope_cache.rope_and_write(q, k, v, positions, self.lengths, self.k[i], self.v[i], inv_freq,
                                               interpret=mode == "interpret")
        return qr, kc, vc, (kc, vc)

    def advance(self, entries: list, lengths: jax.Array) -> "KVCache":
        """The cache holding every layer's new entry, with `lengths` valid slots."""
        return dataclasses.replace(self, k=[e[0] for e in entries], v=[e[1] for e in entries], lengths=lengths)

    def rollback(self, lengths) -> "KVCache":
        """The same cache with `lengths` (int or int32 [B]) valid slots; later slots are ignored."""
        lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), self.lengths.shape)
        return dataclasses.replace(self, lengths=lengths)


def _quantize_heads(x):
    """Per (token, head) symmetric int8 over head_dim: (codes int8, scales fp16 [..., 1])."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float16)
    codes = jnp.clip(jnp.round(xf / scale.astype(jnp.float32)), -127, 127).astype(jnp.int8)
    return codes, scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8KVCache(KVCache):
    """Keys/values as int8 with one fp16 scale per (token, head): half the bytes of bf16.

    New keys are quantized when written; attention reads the whole buffer dequantized to the
    compute dtype, so every key it sees (the current token's too) went through int8.
    """

    k_scale: list
    v_scale: list

    def update_layer(self, i: int, k: jax.Array, v: jax.Array):
        kq, ks = _quantize_heads(k)
        vq, vs = _quantize_heads(v)
        kc = write_slots(self.k[i], kq, self.lengths)
        vc = write_slots(self.v[i], vq, self.lengths)
        ksc = write_slots(self.k_scale[i], ks, self.lengths)
        vsc = write_slots(self.v_scale[i], vs, self.lengths)
        k_all = kc.astype(k.dtype) * ksc.astype(k.dtype)
        v_all = vc.astype(v.dtype) * vsc.astype(v.dtype)
        return k_all, v_all, (kc, vc, ksc, vsc)

    def advance(self, entries: list, lengths: jax.Array) -> "Int8KVCache":
        return dataclasses.replace(self, k=[e[0] for e in entries], v=[e[1] for e in entries],
                                   k_scale=[e[2] for e in entries], v_scale=[e[3] for e in entries], lengths=lengths)


def init_kv_cache(batch: int, max_len: int, kv_heads, head_dim: int, dtype) -> KVCache:
    """`kv_heads` is one int per layer; dtype int8 (or "int8") gives an `Int8KVCache`."""
    if jnp.dtype(dtype) == jnp.int8:
        shapes = [(batch, max_len, h, head_dim) for h in kv_heads]
        return Int8KVCache(k=[jnp.zeros(s, jnp.int8) for s in shapes], v=[jnp.zeros(s, jnp.int8) for s in shapes],
                           lengths=jnp.zeros((batch,), jnp.int32),
                           k_scale=[jnp.zeros(s[:-1] + (1,), jnp.float16) for s in shapes],
                           v_scale=[jnp.zeros(s[:-1] + (1,), jnp.float16) for s in shapes])
    k = [jnp.zeros((batch, max_len, h, head_dim), dtype) for h in kv_heads]
    v = [jnp.zeros((batch, max_len, h, head_dim), dtype) for h in kv_heads]
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32))


def write_slots(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, H, D] into buf [B, S, H, D] at slots start[b] + t.

    Out-of-range slots are dropped, never clamped onto valid ones (`dynamic_update_slice`
    would shift them); callers check capacity before decoding.
    """
    b, t = new.shape[:2]
    slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    bidx = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], slots.shape)
    return buf.at[bidx, slots].set(new.astype(buf.dtype), mode="drop")
