"""Grouped matmul (the `jax.lax.ragged_dot` contract) for mixture-of-experts layers.

`api.grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G])` multiplies the rows of each
group (rows sorted by group, groups contiguous from row 0) by that group's matrix; rows past
sum(group_sizes) come out zero. Forward and backward (custom_vjp) on every implementation.
"""
