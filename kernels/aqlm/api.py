"""Chooses the AQLM matmul: the Pallas lookup kernel on GPU for decode-sized inputs, else XLA.

`impl`: "auto" (kernel on GPU when `gpu.supported`), "xla" (dequantize, then one dot),
"pallas" (the GPU kernel; error if unsupported), "interpret" (the GPU kernel in Pallas'
interpreter, for CPU tests). Gradients flow to x only (custom_vjp through the XLA path).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.aqlm import reference

IMPLS = ("auto", "xla", "pallas", "interpret", "interpret-tpu")


def choose(rows: int, g: int, n: int, impl: str = "auto") -> str:
    """'xla', 'gpu' or 'interpret'."""
    if impl not in IMPLS:
        raise ValueError(f"unknown AQLM matmul impl {impl!r}; use one of {IMPLS}")
    if impl in ("xla", "interpret-tpu"):  # no TPU kernel: its interpreter runs the XLA path
        return "xla"
    from kernels.aqlm import gpu

    why = gpu.supported(rows, g, n)
    if impl == "interpret":
        return "xla" if why else "interpret"
    if jax.default_backend() == "gpu" and not why:
        return "gpu"
    if impl == "pallas":
        raise ValueError(f"AQLM matmul: no Pallas kernel for {rows} rows, {g} groups, N={n} on "
                         f"{jax.default_backend()}: {why or 'GPU only'}")
    return "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _kernel(x2, codes, codebooks, scales, interpret, out_dtype):
    from kernels.aqlm import gpu

    return gpu.aqlm_matmul(x2, codes, codebooks, scales, out_dtype=out_dtype, interpret=interpret)


def _fwd(x2, codes, codebooks, scales, interpret, out_dtype):
    return _kernel(x2, codes, codebooks, scales, interpret, out_dtype), (x2, codes, codebooks, scales)


def _bwd(interpret, out_dtype, res, dy):
    x2, codes, codebooks, scales = res
    w = reference.dequantize(codes, codebooks, scales, jnp.float32)
    dx = jnp.dot(dy.astype(jnp.float32), w.T).astype(x2.dtype)
    return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(codebooks), jnp.zeros_like(scales)


_kernel.defvjp(_fwd, _bwd)


def aqlm_matmul(x, codes, codebooks, scales, *, out_dtype=None, impl: str = "auto"):
    """x [..., K] @ W [K, N], W in the AQLM format of `kernels.aqlm.reference`."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    _, g, n = codes.shape
    which = choose(rows, g, n, impl)
    if which == "xla":
        return reference.matmul(x, codes, codebooks, scales, out_dtype=out_dtype)
    y = _kernel(x.reshape(rows, k), codes, codebooks, scales, which == "interpret", out_dtype)
    return y.reshape(*lead, n)
