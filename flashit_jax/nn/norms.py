"""RMSNorm, computed in fp32 and returned in the input dtype, with a one-pass backward.

`plain_autodiff()` turns the hand-written backwards of this package (RMSNorm here, SwiGLU in linear.py)
off while a function is traced, so a benchmark can time both forms in one run (train.bench's
`ours-autodiff` row).
"""
import contextlib
import functools

import jax
import jax.numpy as jnp

_HAND_VJP = [True]


@contextlib.contextmanager
def plain_autodiff():
    """Within: rms_norm and silu_mul trace as plain expressions (autodiff's backward)."""
    _HAND_VJP.append(False)
    try:
        yield
    finally:
        _HAND_VJP.pop()


def hand_vjp() -> bool:
    return _HAND_VJP[-1]


def _rms_norm(x, scale, eps, offset):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(eps))
    s = scale.astype(jnp.float32)
    if offset:
        s = s + jnp.float32(offset)
    return (x32 * r * s).astype(x.dtype), r


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x / rms(x) * (offset + scale). Gemma stores scale - 1, hence `offset=1`."""
    if hand_vjp():
        return _rms_norm_vjp(x, scale, float(eps), float(offset))
    return _rms_norm(x, scale, eps, offset)[0]


# Autodiff of the expression above spreads the backward over several passes (the session-11 profile of a
# Llama-3.2-1B training step on an H200 put ~8 ms a step in RMSNorm, ~240 us a norm against ~40 us to move
# its bytes). Here dx = r (g - x r^2 mean(g x)) with g = dy s, and dscale = sum dy x r, from the saved
# per-row r: one row reduction for dx, one column reduction for dscale.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm_vjp(x, scale, eps, offset):
    return _rms_norm(x, scale, eps, offset)[0]


def _rms_norm_fwd(x, scale, eps, offset):
    y, r = _rms_norm(x, scale, eps, offset)
    return y, (x, scale, r)


def _rms_norm_bwd(eps, offset, res, dy):
    del eps
    x, scale, r = res
    f32 = jnp.float32
    x32, dy32 = x.astype(f32), dy.astype(f32)
    s = scale.astype(f32) + f32(offset) if offset else scale.astype(f32)
    g = dy32 * s
    dx = r * (g - x32 * (r * r) * jnp.mean(g * x32, axis=-1, keepdims=True))
    ds = jnp.sum((dy32 * x32 * r).reshape(-1, x.shape[-1]), axis=0).reshape(scale.shape)
    return dx.astype(x.dtype), ds.astype(scale.dtype)


_rms_norm_vjp.defvjp(_rms_norm_fwd, _rms_norm_bwd)
