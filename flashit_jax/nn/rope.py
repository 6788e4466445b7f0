"""Rotary position embeddings in the "rotate half" layout (HF's; GGUF llama weights are un-permuted to it)."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """`kind` is "linear" or "llama3"; fields as in HF's `rope_scaling`/`rope_parameters`."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                    freq_factors: tuple[float, ...] | None = None, rotary_dim: int | None = None) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] in float64 numpy (constants folded at trace time)."""
    rd = rotary_dim or head_dim
    inv = 1.0 / (theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    if freq_factors is not None:  # llama.cpp's rope_freqs tensor: theta_i / factor_i
        inv = inv / np.asarray(freq_factors, np.float64)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "llama3":
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)
    raise ValueError(f"unsupported rope scaling {scaling.kind!r} (supported: linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, T, H, D], positions int [B, T]. Angles in fp32; output in x's dtype."""
    rd = 2 * inv_freq.shape[0]
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, rd/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xr = x[..., :rd].astype(jnp.float32)
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return out if rd == x.shape[-1] else jnp.concatenate([out, x[..., rd:]], axis=-1)
