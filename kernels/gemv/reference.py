"""Skinny matmuls of decoding (a few rows times a large weight), fp32 accumulation."""
import jax
import jax.numpy as jnp


def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> fp32 [M, N]."""
    return jnp.einsum("mk,kn->mn", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def matvec_t(x: jax.Array, e: jax.Array) -> jax.Array:
    """x [M, D] @ e[V, D].T -> fp32 [M, V] (tied embedding as the output head)."""
    return jnp.einsum("md,vd->mv", x, e.astype(x.dtype), preferred_element_type=jnp.float32)
