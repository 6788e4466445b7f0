"""Incoherence processing for quantization: randomized Hadamard rotations (QuIP#, QuaRot).

Two ways to apply R = diag(signs) H / sqrt(n) (orthogonal, `flashit_jax.nn.hadamard`):

- on the fly: a linear's weight becomes RotatedWeight(quantize(R^T W)); at run time x is
  rotated by the fast transform before the quantized matmul. GPTQ sees the rotated inputs'
  Hessian R^T H R. Works for every linear, including `down` (whose input, silu(gate) * up, no
  neighbouring layer can absorb a rotation of).
- folded: v's output channels and o's input rows are rotated per head by the same R_hd
  (attention is linear in v: softmax(.) (v R) = (softmax(.) v) R, and o's rows absorb R^T),
  so the float model computes the same function and nothing runs at inference time.

A `-hadamard` recipe folds v/o and rotates every other matrix on the fly. Signs are drawn
from a seed and the parameter path, so a recipe is reproducible.
"""
from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.hadamard import (
    RotatedWeight,
    factor,
    random_signs,
    rotation,
    transform,
)


def path_seed(path: str, seed: int) -> int:
    return (zlib.crc32(path.encode()) + 1_000_003 * int(seed)) % 2**32


def rotate_input(w_kn, signs):
    """R^T W for W [K, N]: each column rotated like an input row vector (W^T R)^T."""
    return transform(jnp.asarray(w_kn, jnp.float32).T, jnp.asarray(signs)).T


def rotate_hessian(h, signs):
    """R^T H R for H [K, K] (the Hessian of the rotated inputs x R)."""
    h = jnp.asarray(h, jnp.float32)
    s = jnp.asarray(signs)
    return transform(transform(h, s).T, s).T


def check_size(path: str, k: int) -> None:
    try:
        factor(k)
    except FlashitError as e:
        raise FlashitError(f"Hadamard rotation of {path} (input dimension {k}): {e}") from None


def wrap(path: str, inner, signs) -> RotatedWeight:
    return RotatedWeight(inner=inner, signs=jnp.asarray(signs, jnp.int8))


# ----------------------------------------------------------------------------- v/o fold
def head_rotation(head_dim: int, seed: int) -> np.ndarray:
    """R_hd [hd, hd] float64, the same for every head."""
    factor(head_dim)
    return rotation(head_dim, random_signs(head_dim, seed))


def fold_vo(flat: dict, layer_prefix: str, head_dim: int, n_heads: int, n_kv_heads: int, r: np.ndarray) -> None:
    """v's output channels x R per KV head, o's input rows R^T x per query head (in place, exact)."""
    rj = jnp.asarray(r, jnp.float32)
    v_key, o_key = layer_prefix + "attn/v/w", layer_prefix + "attn/o/w"
    for key in (v_key, o_key, layer_prefix + "attn/v/b"):
        if key in flat and not hasattr(flat[key], "astype"):
            raise FlashitError(f"cannot fold a Hadamard rotation into {key}: it is already quantized")
    v = flat[v_key]
    d = v.shape[0]
    vv = v.astype(jnp.float32).reshape(d, n_kv_heads, head_dim)
    flat[v_key] = jnp.einsum("dhi,ij->dhj", vv, rj, precision="highest").reshape(d, -1).astype(v.dtype)
    if layer_prefix + "attn/v/b" in flat:
        b = flat[layer_prefix + "attn/v/b"]
        flat[layer_prefix + "attn/v/b"] = (b.astype(jnp.float32).reshape(n_kv_heads, head_dim) @ rj).reshape(-1) \
            .astype(b.dtype)
    o = flat[o_key]
    oo = o.astype(jnp.float32).reshape(n_heads, head_dim, o.shape[1])
    flat[o_key] = jnp.einsum("ji,hjn->hin", rj, oo, precision="highest").reshape(o.shape).astype(o.dtype)


def fold_hessian_heads(h, r: np.ndarray, n_heads: int):
    """Hessian of o's rotated input: blockdiag(R)^T H blockdiag(R)."""
    big = np.kron(np.eye(n_heads), r)
    bj = jnp.asarray(big, jnp.float32)
    return bj.T @ jnp.asarray(h, jnp.float32) @ bj


def fold_model(params, config, *, seed: int = 0):
    """The float params with every layer's v/o pair rotated per head (same function, new basis)."""
    from flashit_jax import tree

    flat = dict(tree.flatten(params))
    r = head_rotation(config.head_dim, seed)
    for i in range(len(params["layers"])):
        fold_vo(flat, f"layers/{i}/", config.head_dim, config.n_heads, config.n_kv_heads, r)
    return tree.unflatten(flat)
