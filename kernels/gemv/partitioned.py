"""The GEMV kernels on sharded weights (tensor-parallel decoding), through `custom_partitioning`.

A Pallas call has no SPMD partitioning rule of its own: in a jitted function over a multi-device
mesh XLA would gather its operands whole onto every device. Here the partitioner is told what a
matrix-vector product is (`m k, k n -> m n`, k a reduction factor), and each device runs the
kernel on its own block of the weight:

    w [K, N] split over N (q/k/v, gate/up: "column parallel")  -> output split over N
    w [K, N] split over K (o, down: "row parallel")            -> partial products, psum over K's axes
    e [V, D] split over V (vocab-parallel output head)         -> logits split over V

Activation rows (M, a handful) are replicated unless the batch axes split them.
"""
from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _dims(shape) -> list[tuple[str, ...]]:
    spec = tuple(shape.sharding.spec) if hasattr(shape.sharding, "spec") else ()
    spec = spec + (None,) * (len(shape.shape) - len(spec))
    return [_axes(e) for e in spec]


def _plan(mesh, arg_shapes, transposed: bool):
    """(axes of K, shardings of x, w, out): w keeps its sharding, x follows it on K."""
    (xm, _), w = _dims(arg_shapes[0]), _dims(arg_shapes[1])
    k, n = (w[1], w[0]) if transposed else (w[0], w[1])
    m = tuple(a for a in xm if a not in k + n)
    x_sh = NamedSharding(mesh, P(_entry(m), _entry(k)))
    w_sh = NamedSharding(mesh, P(_entry(n), _entry(k)) if transposed else P(_entry(k), _entry(n)))
    return k, x_sh, w_sh, NamedSharding(mesh, P(_entry(m), _entry(n)))


def _local(x, w, transposed: bool, interpret: bool):
    from kernels.gemv import gpu

    return (gpu.matvec_t if transposed else gpu.matvec)(x, w, interpret=interpret)


def _make(transposed: bool):
    @functools.partial(custom_partitioning, static_argnums=(2,))
    def fn(x, w, interpret):
        return _local(x, w, transposed, interpret)

    def infer(interpret, mesh, arg_shapes, result_shape):
        return _plan(mesh, arg_shapes, transposed)[3]

    def partition(interpret, mesh, arg_shapes, result_shape):
        k, x_sh, w_sh, out_sh = _plan(mesh, arg_shapes, transposed)

        def lower(x, w):
            y = _local(x, w, transposed, interpret)
            return jax.lax.psum(y, k) if k else y

        return mesh, lower, out_sh, (x_sh, w_sh)

    fn.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule="m k, n k -> m n" if transposed else "m k, k n -> m n", reduction_factors=("k",))
    return fn


_matvec, _matvec_t = _make(False), _make(True)


def matvec(x: jax.Array, w: jax.Array, interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] -> fp32 [M, N], each device on its block of a sharded w."""
    return _matvec(x, w, interpret)


def matvec_t(x: jax.Array, e: jax.Array, interpret: bool = False) -> jax.Array:
    """x [M, D] @ e [V, D].T -> fp32 [M, V], each device on its block of a sharded e."""
    return _matvec_t(x, e, interpret)
