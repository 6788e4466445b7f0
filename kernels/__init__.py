"""Pallas kernels and their pure-jnp references, one folder per op family."""
from __future__ import annotations

import math

import jax


def under_split_mesh() -> bool:
    """Whether we are tracing inside `jax.set_mesh(mesh)` with more than one device on its
    automatic (not shard_map-manual) axes. Our Pallas kernels have no SPMD partitioning rule: XLA
    would gather their operands whole onto every device, so `auto` choices take XLA ops (or cuDNN,
    which has one) there. Inside `shard_map` the kernels see local shards and are used as usual."""
    m = jax.sharding.get_abstract_mesh()
    if m.empty:
        return False
    manual = jax.sharding.AxisType.Manual
    return math.prod(s for s, t in zip(m.axis_sizes, m.axis_types) if t != manual) > 1
