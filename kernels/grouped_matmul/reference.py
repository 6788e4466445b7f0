"""Pure-jnp references: `jax.lax.ragged_dot` (what XLA runs) and a per-row loop-free version."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_dot(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, preferred_element_type=None,
               precision=None):
    """XLA's grouped matmul; `transpose_rhs`: rhs is [G, N, K]."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=precision,
                              preferred_element_type=preferred_element_type)


def row_groups(group_sizes, m: int):
    """int32 [m]: the group of each row, G for rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def grouped_matmul_dense(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, preferred_element_type=None):
    """Definition by masking: every row against every group's matrix, keep its own (tests only)."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    g = rhs.shape[0]
    gid = row_groups(group_sizes, lhs.shape[0])
    out_dtype = preferred_element_type or lhs.dtype
    all_groups = jnp.einsum("mk,gkn->gmn", lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
    onehot = (gid[None, :] == jnp.arange(g, dtype=jnp.int32)[:, None]).astype(jnp.float32)
    return jnp.einsum("gmn,gm->mn", all_groups, onehot, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def transposed_grouped_matmul(lhs, dout, group_sizes, num_groups: int, *, preferred_element_type=None):
    """[G, K, N]: lhs_g^T @ dout_g for each group (the rhs gradient of the grouped matmul)."""
    gid = row_groups(group_sizes, lhs.shape[0])
    onehot = (gid[:, None] == jnp.arange(num_groups, dtype=jnp.int32)[None, :]).astype(lhs.dtype)
    out = jnp.einsum("mk,mg,mn->gkn", lhs, onehot, dout, preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)
