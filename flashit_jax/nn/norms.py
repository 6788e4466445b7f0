"""RMSNorm, computed in fp32 and returned in the input dtype."""
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x / rms(x) * (offset + scale). Gemma stores scale - 1, hence `offset=1`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(eps))
    s = scale.astype(jnp.float32)
    if offset:
        s = s + jnp.float32(offset)
    return (y * s).astype(x.dtype)
