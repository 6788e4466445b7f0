"""Meshes and logical-axis sharding rules (the maxtext scheme).

A model family names the logical axes of each parameter (`PARAM_AXES` in its module: a list of
(regex over '/'-joined paths, tuple of logical names per dimension)); one rules table maps each
logical name onto mesh axes:

    mesh = make_mesh(data=-1, fsdp=1, tensor=1)        # axes (data, fsdp, tensor, expert)
    params = shard_params(params, mesh, model.family.PARAM_AXES)
    batch = shard_batch(batch, mesh)                    # leading dim over (data, fsdp, expert)

Nothing in the model changes: XLA's SPMD partitioner inserts the collectives. Parameters no rule
matches are replicated; a dimension a mesh axis does not divide is replicated too (logged once),
so a rules table written for one model works for any shape. Packed weight types (QArray,
sparse) are replicated leaf by leaf.

Decoding caches follow the same rules (`CACHE_AXES`): with `tensor` > 1 the KV heads of the cache
sit on the devices that hold those heads' projections, so a tensor-parallel decode step
(`generate(..., mesh=mesh)`) moves only activations between devices.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flashit_jax import tree
from flashit_jax.errors import FlashitError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated). The batch goes over every
# axis that holds distinct examples; the expert axis doubles as data parallelism outside MoE layers.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("state", None),
    ("conv", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1, *,
              devices: Sequence | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, expert); one size may be -1 (the rest of the devices).

    Devices are laid out by `jax.make_mesh`, which keeps the innermost axes (tensor) on the
    fastest links. Works across hosts after `jax.distributed.initialize()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor, expert]
    if sum(s == -1 for s in sizes) > 1:
        raise FlashitError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor} "
                           f"expert={expert}")
    if any(s == 0 or s < -1 for s in sizes):
        raise FlashitError(f"mesh: axis sizes must be positive (or one -1), got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise FlashitError(f"mesh: {len(devices)} devices cannot be split into axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise FlashitError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                           f"there are {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # some device kinds reject make_mesh's topology-aware layout
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def _as_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def logical_to_spec(logical: Sequence[str | None], mesh: Mesh, rules: Iterable = DEFAULT_RULES,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for one array whose dimensions carry `logical` names.

    A mesh axis is used at most once per array (first dimension wins); mesh axes of size 1 are
    dropped; with `shape`, a dimension its mesh axes do not divide is replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for d, name in enumerate(logical):
        axes = [a for a in _as_tuple(table.get(name)) if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        if shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[d] % size:
                log.info("replicating dim %d (%s, size %d): mesh axes %s (size %d) do not divide it",
                         d, name, shape[d], axes, size)
                axes = []
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def axes_of(path: str, ndim: int, param_axes: Iterable) -> tuple[str | None, ...]:
    """Logical names of the parameter at `path` (all None, replicated, when no rule matches)."""
    names = tree.first_match(path, param_axes)
    if names is None or len(names) != ndim:
        return (None,) * ndim
    return tuple(names)


def family_axes(model_or_family) -> list:
    """`PARAM_AXES` of a model (`models.Model`) or family module; [] (replicate) when it has none."""
    fam = getattr(model_or_family, "family", model_or_family)
    return list(getattr(fam, "PARAM_AXES", []))


def param_shardings(params, mesh: Mesh, param_axes: Iterable, rules: Iterable = DEFAULT_RULES):
    """A pytree of NamedSharding matching `params` (arrays, ShapeDtypeStructs or packed weights)."""
    param_axes, rules = list(param_axes), list(rules)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        if tree.is_leaf_weight(leaf):  # packed weight: replicate each of its arrays
            return jax.tree.map(lambda _: replicated, leaf)
        shape = tuple(leaf.shape)
        spec = logical_to_spec(axes_of(path, len(shape), param_axes), mesh, rules, shape)
        return NamedSharding(mesh, spec)

    return tree.map_with_path(one, params)


def shard_params(params, mesh: Mesh, param_axes: Iterable, rules: Iterable = DEFAULT_RULES):
    """Place `params` on the mesh by the rules (a copy; the input is left as it was)."""
    return jax.device_put(params, param_shardings(params, mesh, param_axes, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Iterable = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the rules' batch axes, the rest replicated."""
    names = ("batch",) + ("length",) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules))


def batch_shards(mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> int:
    """How many ways the batch dimension is split (the global batch must be a multiple)."""
    return math.prod(mesh.shape[a] for a in _as_tuple(dict(rules).get("batch")) if a in mesh.shape)


def process_batch_slice(global_batch: int, mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> slice:
    """The rows of a global batch that this process feeds (`shard_batch` with `local=True`).

    Rows follow the batch sharding: each process owns the contiguous block its devices hold.
    """
    sh = batch_sharding(mesh, 1, rules)
    idx = sh.addressable_devices_indices_map((global_batch,))
    starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch) for s in idx.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise FlashitError("this process's batch rows are not contiguous on this mesh; use a mesh whose batch "
                           "axes span hosts in order")
    return slice(lo, hi)


def shard_batch(batch, mesh: Mesh, rules: Iterable = DEFAULT_RULES, *, local: bool = False):
    """Put a batch (pytree of arrays with a leading batch dim) on the mesh, split over the batch axes.

    local=False: every process passes the whole global batch (single host, or identical data).
    local=True: each process passes only its rows (`process_batch_slice`), as a multi-host
    input pipeline does; the global array is assembled without moving data between hosts.
    """
    def put(x):
        x = np.asarray(x)
        sh = batch_sharding(mesh, x.ndim, rules)
        if local:
            return jax.make_array_from_process_local_data(sh, x)
        n = batch_shards(mesh, rules)
        if x.shape[0] % n:
            raise FlashitError(f"batch size {x.shape[0]} is not a multiple of the {n} batch shards of the mesh")
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(put, batch)


# Logical axes of decoding-cache leaves (regex over '/'-joined paths of the cache pytree; see
# flashit_jax.nn.cache): keys/values [B, max_len, Hkv, D] (int8 scales [B, max_len, Hkv, 1]),
# lengths [B]. Unmatched leaves (recurrent states of other cache types) are replicated.
CACHE_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(k|v|k_scale|v_scale)/\d+", ("batch", "length", "kv_heads", None)),
    (r"lengths", ("batch",)),
)


def cache_specs(cache, mesh, cache_axes: Iterable = CACHE_AXES, rules: Iterable = DEFAULT_RULES):
    """A pytree of PartitionSpec matching a decoding cache (a batch of 1 is replicated). `mesh` may
    be abstract (`jax.sharding.get_abstract_mesh()` inside a jitted function)."""
    cache_axes, rules = list(cache_axes), list(rules)

    def one(path, leaf):
        shape = tuple(leaf.shape)
        return logical_to_spec(axes_of(path, len(shape), cache_axes), mesh, rules, shape)

    return jax.tree_util.tree_map_with_path(lambda p, x: one(tree.path_str(p), x), cache)


def cache_shardings(cache, mesh: Mesh, cache_axes: Iterable = CACHE_AXES, rules: Iterable = DEFAULT_RULES):
    """A pytree of NamedSharding matching a decoding cache."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache, mesh, cache_axes, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh, shape: Sequence[int], rules: Iterable = DEFAULT_RULES) -> P:
    """PartitionSpec of an array with a leading batch dim (replicated where the batch axes do not
    divide it, e.g. batch 1); `mesh` may be abstract."""
    return logical_to_spec(("batch",) + ("length",) * (len(shape) - 1), mesh, rules, shape)


def constrain_batch(x):
    """Inside a function traced under `jax.set_mesh(mesh)`: x's leading dim over the batch axes
    (per-row tokens and flags keep one placement from step to step; no mesh: unchanged)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, batch_spec(mesh, x.shape))


def constrain_cache(cache):
    """Inside a function traced under `jax.set_mesh(mesh)`: keep the cache where `shard_cache`
    put it (a step's output cache is the next step's input; no mesh: unchanged)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_specs(cache, mesh))


def shard_cache(cache, mesh: Mesh, cache_axes: Iterable = CACHE_AXES, rules: Iterable = DEFAULT_RULES):
    """Place a decoding cache on the mesh by the rules (KV heads over `tensor`)."""
    return jax.device_put(cache, cache_shardings(cache, mesh, cache_axes, rules))


def describe(params, shardings) -> str:
    """One line per parameter: path, shape, PartitionSpec (for logs and debugging)."""
    flat_p, flat_s = tree.flatten(params), tree.flatten(shardings)
    return "\n".join(f"{k}: {tuple(v.shape)} {getattr(flat_s.get(k), 'spec', flat_s.get(k))}"
                     for k, v in flat_p.items())


__all__ = ["MESH_AXES", "DEFAULT_RULES", "make_mesh", "logical_to_spec", "axes_of", "family_axes",
           "param_shardings", "shard_params", "batch_sharding", "batch_shards",
           "process_batch_slice", "shard_batch", "CACHE_AXES", "batch_spec", "constrain_batch", "cache_specs", "cache_shardings", "constrain_cache",
           "shard_cache", "describe"]
