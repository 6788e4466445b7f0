"""One decode step's q|k|v post-processing as one Pallas (Triton) kernel: rotary embedding of q and k,
and the new key and value written into the KV cache in place.

XLA runs these as ~7 small kernels per layer (the q|k|v split, the rotation's concatenate, two cache
writes with their bounds selects; H200 profile, 2026-12-05: ~130 us of a ~1100 us Llama-3.2-1B step).
One program per (sequence, KV head): it rotates that head's group of query heads and its key (the
"rotate half" layout of `flashit_jax.nn.rope`, angles in fp32, results rounded to the input dtype as
`apply_rope` rounds them) and stores the key and value at slot `lengths[b]` of the (aliased) cache
buffers; a slot past the cache is dropped, as `nn.cache.write_slots` drops it. Opt-in until timed:
`FLASHIT_JAX_ROPE_KERNEL=1` (or "interpret").
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def mode() -> str:
    """'' (off), 'gpu' or 'interpret', from FLASHIT_JAX_ROPE_KERNEL (0/1/interpret)."""
    v = os.environ.get("FLASHIT_JAX_ROPE_KERNEL", "0")
    if v not in ("0", "1", "interpret"):
        raise ValueError(f"FLASHIT_JAX_ROPE_KERNEL must be 0, 1 or interpret, got {v!r}")
    if v == "interpret":
        return v
    return "gpu" if v == "1" and jax.default_backend() == "gpu" else ""


def supported(q, k, v, k_cache, inv_freq) -> str:
    """'' if the kernel serves this step, else why not (the caller keeps the XLA ops)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if t != 1:
        return f"{t} new tokens (the kernel serves one-token decode steps)"
    if 2 * inv_freq.shape[0] != d or d & (d - 1) or d < 16:
        return "partial rotary dims or a head dim that is not a power of two >= 16"
    if hq % hkv or (hq // hkv) & (hq // hkv - 1):
        return f"{hq} query heads over {hkv} KV heads (a power-of-two group is needed)"
    if k_cache.dtype != k.dtype or v.dtype != k.dtype or q.dtype != k.dtype:
        return "the cache dtype differs from the keys' (int8 caches quantize them)"
    return ""


def _kernel(pos_ref, len_ref, freq_ref, q_ref, k_ref, v_ref, kc_in, vc_in, qo_ref, kc_ref, vc_ref, *,
            group: int, half: int, slots: int):
    del kc_in, vc_in  # aliased to kc_ref / vc_ref
    bi, hi = pl.program_id(0), pl.program_id(1)
    f32 = jnp.float32
    ang = pos_ref[bi].astype(f32) * freq_ref[...]  # [D/2]
    cos, sin = jnp.cos(ang)[None, :], jnp.sin(ang)[None, :]
    lo, hi_half = pl.ds(0, half), pl.ds(half, half)

    def rotate(ref, heads):  # heads of sequence bi -> (first half, second half), rounded to the dtype
        x1 = ref[bi, 0, heads, lo].astype(f32)  # (one indexer per access: Pallas' Triton lowering takes no more)
        x2 = ref[bi, 0, heads, hi_half].astype(f32)
        return (x1 * cos - x2 * sin).astype(ref.dtype), (x2 * cos + x1 * sin).astype(ref.dtype)

    qh = pl.ds(hi * group, group)
    a, b = rotate(q_ref, qh)
    qo_ref[bi, 0, qh, lo] = a
    qo_ref[bi, 0, qh, hi_half] = b
    kh = pl.ds(hi, 1)
    ka, kb = rotate(k_ref, kh)
    slot = len_ref[bi]
    ok = slot < slots  # past the cache: dropped, never clamped onto a valid slot
    keep = jnp.broadcast_to(ok, (1, half))
    at = jnp.minimum(slot, slots - 1)  # an address inside the buffer; the mask drops the write
    plgpu.store(kc_ref.at[bi, pl.ds(at, 1), hi, lo], ka, mask=keep)
    plgpu.store(kc_ref.at[bi, pl.ds(at, 1), hi, hi_half], kb, mask=keep)
    vrow = v_ref[bi, 0, kh, :]
    plgpu.store(vc_ref.at[bi, pl.ds(at, 1), hi, :], vrow, mask=jnp.broadcast_to(ok, vrow.shape))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _call(q, k, v, positions, lengths, k_cache, v_cache, inv_freq, *, interpret: bool):
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    kernel = functools.partial(_kernel, group=hq // hkv, half=d // 2, slots=k_cache.shape[1])
    q_out, kc, vc = pl.pallas_call(
        kernel, grid=(b, hkv),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={6: 1, 7: 2},
        compiler_params=plgpu.CompilerParams(num_warps=1), interpret=interpret, name="flashit_rope_cache",
    )(positions[:, 0].astype(jnp.int32), lengths.astype(jnp.int32), inv_freq, q, k, v, k_cache, v_cache)
    return q_out, kc, vc


def rope_and_write(q, k, v, positions, lengths, k_cache, v_cache, inv_freq: np.ndarray, *, interpret: bool = False):
    """q, k, v [B, 1, H, D] (one decode step), positions int [B, 1], lengths int [B] (the slot to write),
    caches [B, S, Hkv, D] -> (rotated q, cache with the rotated key written, cache with the value written)."""
    why = supported(q, k, v, k_cache, inv_freq)
    if why:
        raise ValueError(f"rope_and_write: {why}")
    return _call(q, k, v, positions, lengths, k_cache, v_cache, jnp.asarray(inv_freq, jnp.float32),
                 interpret=interpret)
