"""Chooses the ternary matmul implementation: the Pallas (Triton) kernel on GPU where the shape
fits, else the XLA reference (unpack, int8 dot).

    ternary_matmul(xq, sx, packed, sw, n=)   int8 activations x packed ternary weights
    linear(x, packed, sw, n=)                 quantizes x per row to int8 first (BitLinear)

`impl`: "auto", "xla", "pallas" (error if unsupported), "interpret" (the GPU kernel in Pallas'
interpreter, for CPU tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.ternary import reference

IMPLS = ("auto", "xla", "pallas", "interpret")


def choose(m: int, k: int, n: int, impl: str = "auto") -> str:
    """'xla', 'gpu' or 'interpret'."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ternary impl {impl!r}; use one of {IMPLS}")
    if impl == "xla":
        return "xla"
    from kernels.ternary import gpu

    why = gpu.supported(m, k, n)
    if impl == "interpret":
        if why:
            raise ValueError(f"ternary_matmul: {why}")
        return "interpret"
    if jax.default_backend() == "gpu" and not why:
        return "gpu"
    if impl == "pallas":
        raise ValueError(f"ternary_matmul: no Pallas kernel for M={m} K={k} N={n} on {jax.default_backend()}"
                         + (f": {why}" if why else ""))
    return "xla"


def ternary_matmul(xq, sx, packed, sw, *, n: int, out_dtype=jnp.float32, impl: str = "auto"):
    """(xq int8 [..., K] * sx [..., 1]) @ (ternary [K, N] * sw)."""
    k = xq.shape[-1]
    lead = xq.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    which = choose(m, k, n, impl)
    if which == "xla":
        return reference.ternary_matmul(xq, sx, packed, sw, n=n, out_dtype=out_dtype)
    from kernels.ternary import gpu

    y = gpu.ternary_matmul(xq.reshape(m, k), sx.reshape(m, 1), packed, sw, n=n, out_dtype=out_dtype,
                           interpret=which == "interpret")
    return y.reshape(*lead, n)


def linear(x, packed, sw, *, n: int, out_dtype=None, impl: str = "auto"):
    xq, sx = reference.quantize_rows_int8(x)
    return ternary_matmul(xq, sx, packed, sw, n=n, out_dtype=out_dtype or x.dtype, impl=impl)
