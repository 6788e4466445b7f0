"""What every kernel shares: block sizes and the tile schedule over ragged row groups.

The rows of `lhs` are cut into tiles of `block_m` rows. A tile that straddles a group
boundary is visited once per group it touches (each visit stores only its group's rows), so
the schedule has at most cdiv(M, block_m) + G work items; rows past sum(group_sizes) form one
more "tail" group whose visits store zeros, as ragged_dot defines them.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4  # GPU (Triton) only
    num_stages: int = 3  # GPU (Triton) only
    group_m: int = 8  # work items per swizzle band (L2 reuse of rhs tiles across row tiles)

    def fit(self, m: int, k: int, n: int) -> "BlockSizes":
        """Shrink blocks to divisors of the problem (K and N must be multiples of 16)."""
        return dataclasses.replace(self, block_m=min(self.block_m, max(16, _pow2_ceil(m))),
                                   block_k=_largest_pow2_divisor(k, self.block_k),
                                   block_n=_largest_pow2_divisor(n, self.block_n))


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _largest_pow2_divisor(x: int, cap: int) -> int:
    b = cap
    while b > 16 and x % b:
        b //= 2
    if x % b:
        raise ValueError(f"dimension {x} is not a multiple of 16")
    return b


def supported(k: int, n: int) -> bool:
    return k % 16 == 0 and n % 16 == 0


class Schedule(NamedTuple):
    """int32 arrays. offsets [G + 3]: group g owns rows offsets[g]:offsets[g+1]; index G is the
    tail (rows past the groups, zero output) and G + 1 an empty sentinel for unused items.
    group_ids / tile_ids [W]: the group and row tile of each work item."""

    offsets: jax.Array
    group_ids: jax.Array
    tile_ids: jax.Array
    num_active: jax.Array  # scalar: work items in use (the rest point at the sentinel)


def num_work_items(m: int, block_m: int, num_groups: int) -> int:
    return -(-m // block_m) + num_groups


def make_schedule(group_sizes: jax.Array, m: int, block_m: int, *, tail: bool = True, repeat_last: bool = False,
                  visit_empty: bool = False) -> Schedule:
    """Work items in row order. `tail`: visit the rows past the groups (to zero them).
    `repeat_last`: unused items repeat the last used one instead of pointing at the empty
    sentinel (TPU: the output block then never changes after the last real item).
    `visit_empty`: give empty groups one item too (the rhs gradient must zero their output)."""
    g = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    tail_end = jnp.full((1,), m, jnp.int32)
    ends_all = jnp.concatenate([ends, tail_end])  # G + 1 groups incl. tail
    starts_all = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_all[:-1]])
    nonempty = ends_all > starts_all
    first_tile = starts_all // block_m
    last_tile = jnp.where(nonempty, (ends_all - 1) // block_m, first_tile)
    count = jnp.where(nonempty, last_tile - first_tile + 1, 0)
    is_group = jnp.arange(g + 1) < g
    if visit_empty:
        count = jnp.where(is_group, jnp.maximum(count, 1), count)
        first_tile = jnp.minimum(first_tile, -(-m // block_m) - 1)
    if not tail:
        count = jnp.where(is_group, count, 0)
    work_end = jnp.cumsum(count)
    work_start = work_end - count
    w_total = num_work_items(m, block_m, g) + (g if visit_empty else 0)
    w = jnp.arange(w_total, dtype=jnp.int32)
    gid = jnp.searchsorted(work_end, w, side="right").astype(jnp.int32)
    num_active = work_end[-1]
    active = w < num_active
    gid_c = jnp.minimum(gid, g)
    tile = first_tile[gid_c] + (w - work_start[gid_c])
    if repeat_last:
        last = jnp.maximum(num_active - 1, 0)
        gid_last = jnp.minimum(jnp.searchsorted(work_end, last, side="right"), g).astype(jnp.int32)
        tile_last = first_tile[gid_last] + (last - work_start[gid_last])
        gid = jnp.where(active, gid_c, gid_last)
        tile = jnp.where(active, tile, tile_last)
    else:
        gid = jnp.where(active, gid_c, g + 1)
        tile = jnp.where(active, tile, 0)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_all, tail_end])
    return Schedule(offsets, gid.astype(jnp.int32), tile.astype(jnp.int32), num_active.astype(jnp.int32))
