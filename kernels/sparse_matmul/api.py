"""Chooses the sparse matmul: the Pallas decode kernels on GPUs for a few rows, XLA otherwise.

    nm_matmul(x, values, meta, n=, m=)          N:M packed weight
    act_sparse_matmul(x, w, threshold)          drop inputs with |x| <= threshold, then x @ w

`impl`: "auto" (kernel on GPU for <= 8 rows), "xla" (the reference: decompress / mask, then
one dot), "pallas" (the GPU kernel, error if it does not take the case), "interpret" (the GPU
kernel in Pallas' interpreter, any backend: tests). Gradients flow to x through the XLA
definition (custom_vjp); the weights are frozen.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.sparse_matmul import reference

IMPLS = ("auto", "xla", "pallas", "interpret")


def choose(rows: int, x_dtype, w_dtype, impl: str = "auto") -> str:
    """'xla', 'gpu' or 'interpret'."""
    if impl not in IMPLS:
        raise ValueError(f"unknown sparse matmul impl {impl!r}; use one of {IMPLS}")
    if impl == "xla":
        return "xla"
    from kernels.sparse_matmul import gpu

    why = gpu.supported(rows, x_dtype, w_dtype)
    if impl == "interpret":
        if why:
            raise ValueError(f"sparse matmul kernel: {why}")
        return "interpret"
    if jax.default_backend() != "gpu":
        why = why or f"no sparse Pallas kernel for the {jax.default_backend()} backend"
    if not why:
        return "gpu"
    if impl == "pallas":
        raise ValueError(f"sparse matmul kernel: {why}")
    return "xla"


def _rows(x) -> int:
    return int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1


def _zero(a):
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
        return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)


# ----------------------------------------------------------------------------- N:M
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _nm_kernel(x2, values, meta, n, m, interpret):
    from kernels.sparse_matmul import gpu

    return gpu.nm_matvec(x2, values, meta, n=n, m=m, interpret=interpret)


def _nm_fwd(x2, values, meta, n, m, interpret):
    return _nm_kernel(x2, values, meta, n, m, interpret), (x2, values, meta)


def _nm_bwd(n, m, interpret, res, dy):
    x2, values, meta = res
    w = reference.nm_decompress(values, meta, n, m, jnp.float32)
    return (jnp.dot(dy.astype(jnp.float32), w.T).astype(x2.dtype), _zero(values), _zero(meta))


_nm_kernel.defvjp(_nm_fwd, _nm_bwd)


def nm_matmul(x, values, meta, *, n: int, m: int, out_dtype=None, impl: str = "auto"):
    """x [..., K] @ W [K, N], W stored N:M (see `reference`)."""
    out_dtype = out_dtype or x.dtype
    which = choose(_rows(x), x.dtype, values.dtype, impl)
    if which == "xla":
        return reference.nm_matmul(x, values, meta, n=n, m=m, out_dtype=out_dtype)
    k = x.shape[-1]
    y = _nm_kernel(x.reshape(-1, k), values, meta, n, m, which == "interpret")
    return y.reshape(*x.shape[:-1], values.shape[-1]).astype(out_dtype)


# ----------------------------------------------------------------------------- activation sparsity
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _act_kernel(xs2, w, interpret):
    from kernels.sparse_matmul import gpu

    return gpu.act_sparse_matvec(xs2, w, interpret=interpret)


def _act_fwd(xs2, w, interpret):
    return _act_kernel(xs2, w, interpret), (xs2, w)


def _act_bwd(interpret, res, dy):
    xs2, w = res
    return jnp.dot(dy.astype(jnp.float32), w.astype(jnp.float32).T).astype(xs2.dtype), _zero(w)


_act_kernel.defvjp(_act_fwd, _act_bwd)


def act_sparse_matmul(x, w, threshold, *, out_dtype=None, impl: str = "auto"):
    """sparsify_activations(x, threshold) @ w [K, N]; the kernel reads only the surviving rows of w."""
    out_dtype = out_dtype or x.dtype
    which = choose(_rows(x), x.dtype, w.dtype, impl)
    if which == "xla":
        return reference.act_sparse_matmul(x, w, threshold, out_dtype=out_dtype)
    k = x.shape[-1]
    xs = reference.sparsify_activations(x, threshold).reshape(-1, k)
    y = _act_kernel(xs, w, which == "interpret")
    return y.reshape(*x.shape[:-1], w.shape[-1]).astype(out_dtype)


__all__ = ["IMPLS", "choose", "nm_matmul", "act_sparse_matmul", "reference"]
