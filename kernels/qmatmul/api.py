"""Chooses the quantized-matmul implementation: Pallas on GPU/TPU where the shape fits, else XLA.

    qmatmul(x, q, scales, zeros, bits=, packing=, n=)   weight-only (W8A16, W4A16, ...)
    int8_matmul(xq, sx, wq, sw)                          W8A8: int8 x int8 -> int32

`impl`: "auto" (the fastest measured: see below), "xla" (dequantize, then one dot),
"pallas" (the kernel of the current backend, error if unsupported), "interpret" (the GPU
kernel in Pallas' interpreter, for CPU tests), "interpret-tpu", "interpret-gemv" (the decode
GEMV route below, interpreted). Gradients flow to x only (custom_vjp: dx = dy @ W^T through the
XLA path); quantized weights are frozen.

Decode route ("gemv"): on GPUs, one row against symmetric int8 weights with one scale per column
(the `w8` recipes and `+emb8`) runs the bf16 decode GEMV kernel (`kernels/gemv/`) on the int8
codes, converted in registers, and scales its fp32 result per column; against `u4x2` weights
(W4, groups of a power of two) its 4-bit twin `kernels/gemv/quant.py` unpacks and dequantizes
each tile in registers. Those kernels split K as well as N so that hundreds of programs stream
the weight; the qmatmul kernel's 16-row tensor-core tile read int8 at 1.19 TB/s against XLA's
4.39 TB/s for bf16 on an H200 (docs/quantization.md).

What `auto` picks on a GPU: one row (M <= 8) against int8 or 4-bit weights goes to the GEMV route,
M > 8 to XLA's dequantize + dot (the qmatmul kernel ran at 0.17-0.45x bf16 at M = 16-256, XLA's
dequantize + dot at 0.34-0.85x; H200, 2026-12-04). Decode of the Llama-3.2-1B shape on an H200
(`eval.quant_speed`, fused layout): 4-bit rows through `matvec_q4` 828 tokens/s (2026-12-04) against
465 through XLA's dequantize + dot (2026-12-05). (Session 6's "949 through XLA" was the GEMV program run
a second time: `generate` reused the program across `matmul_impl` settings; fixed, see `generate._switches`.)
impl="pallas" runs our kernels anyway; FLASHIT_JAX_GEMV_Q4=0 sends 4-bit rows to XLA under auto.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.qmatmul import reference

IMPLS = ("auto", "xla", "pallas", "interpret", "interpret-tpu", "interpret-gemv")


def _backend() -> str:
    return jax.default_backend()


def gemv_fits(m: int, packing: str, groups: int, has_zeros: bool, x_dtype, k: int = 0, n: int = 0) -> bool:
    """Whether the decode GEMV route can serve this product (see the module doc)."""
    if jnp.dtype(x_dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32) or m > 8:
        return False
    if packing == "u4x2":
        from kernels.gemv.quant import q4_supported

        return not q4_supported(k, n, groups)
    return packing == "i8" and groups == 1 and not has_zeros


def choose(m: int, k: int, n: int, packing: str, groups: int, x_dtype, impl: str = "auto",
           has_zeros: bool = False) -> str:
    """'xla', 'gpu', 'gemv', 'tpu', 'interpret', 'interpret-tpu' or 'interpret-gemv'."""
    if impl not in IMPLS:
        raise ValueError(f"unknown qmatmul impl {impl!r}; use one of {IMPLS}")
    if impl == "xla":
        return "xla"
    if impl in ("interpret", "interpret-tpu"):
        return impl
    if impl == "interpret-gemv":
        if not gemv_fits(m, packing, groups, has_zeros, x_dtype, k, n):
            raise ValueError(f"qmatmul: the GEMV route takes symmetric int8 ('i8') with one scale per column, or "
                             f"'u4x2' with power-of-two groups >= 16, and at most 8 rows; got M={m} {packing}, "
                             f"{groups} scale groups of K={k}, zeros={has_zeros}")
        return impl
    backend = _backend()
    why = "no Pallas kernel for this backend"
    if backend == "gpu":
        import os

        from kernels.gemv import api as gemv_api

        wanted = packing == "i8" or impl == "pallas" or os.environ.get("FLASHIT_JAX_GEMV_Q4") != "0"
        if wanted and gemv_fits(m, packing, groups, has_zeros, x_dtype, k, n) and gemv_api.use_kernel(m, x_dtype):
            return "gemv"
        from kernels.qmatmul import gpu

        why = gpu.supported(m, k, n, packing, groups, x_dtype)
        if not why and impl == "pallas":
            return "gpu"
    elif backend == "tpu":
        from kernels.qmatmul import tpu

        why = tpu.supported(m, k, n, packing, groups)
        if not why:
            return "tpu"
    if impl == "pallas":
        raise ValueError(f"qmatmul: no Pallas kernel for M={m} K={k} N={n} {packing} on {backend}: {why}")
    return "xla"


def _kernel_call(which: str, x2, q, scales, zeros, *, bits, packing, n, out_dtype):
    if which in ("gemv", "interpret-gemv"):
        interp = which == "interpret-gemv"
        if packing == "u4x2":
            from kernels.gemv.quant import matvec_q4

            off = reference.code_offset(packing, bits, zeros is not None)
            return matvec_q4(x2, q, scales, zeros, n=n, offset=off, interpret=interp, out_dtype=out_dtype)
        from kernels.gemv import gpu as gemv_gpu

        # int8 codes; the per-column scale and the output dtype applied after the K sum (in the kernel
        # with Blocks.fixup, else by XLA)
        return gemv_gpu.matvec(x2, q, out_scale=scales.astype(jnp.float32), out_dtype=out_dtype, interpret=interp)
    if which in ("gpu", "interpret"):
        from kernels.qmatmul import gpu

        return gpu.qmatmul(x2, q, scales, zeros, bits=bits, packing=packing, n=n, out_dtype=out_dtype,
                           interpret=which == "interpret")
    from kernels.qmatmul import tpu

    return tpu.qmatmul(x2, q, scales, zeros, bits=bits, packing=packing, n=n, out_dtype=out_dtype,
                       interpret=which == "interpret-tpu")


def _zero_cotangent(a):
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
        return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _kernel_vjp(x2, q, scales, zeros, which, bits, packing, n, out_dtype):
    return _kernel_call(which, x2, q, scales, zeros, bits=bits, packing=packing, n=n, out_dtype=out_dtype)


def _fwd(x2, q, scales, zeros, which, bits, packing, n, out_dtype):
    return _kernel_vjp(x2, q, scales, zeros, which, bits, packing, n, out_dtype), (x2, q, scales, zeros)


def _bwd(which, bits, packing, n, out_dtype, res, dy):
    x2, q, scales, zeros = res
    w = reference.dequantize(q, scales, zeros, bits=bits, packing=packing, n=n, dtype=jnp.float32)
    dx = jnp.dot(dy.astype(jnp.float32), w.T).astype(x2.dtype)
    return dx, _zero_cotangent(q), _zero_cotangent(scales), _zero_cotangent(zeros)


_kernel_vjp.defvjp(_fwd, _bwd)


def qmatmul(x, q, scales, zeros=None, *, bits: int, packing: str, n: int, out_dtype=None, impl: str = "auto"):
    """x [..., K] @ W [K, N] for W stored as described in `kernels.qmatmul.reference`."""
    out_dtype = out_dtype or x.dtype
    k = x.shape[-1]
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    which = choose(m, k, n, packing, scales.shape[0], x.dtype, impl, has_zeros=zeros is not None)
    if which == "xla":
        return reference.qmatmul(x, q, scales, zeros, bits=bits, packing=packing, n=n, out_dtype=out_dtype)
    y = _kernel_vjp(x.reshape(m, k), q, scales, zeros, which, bits, packing, n, jnp.dtype(out_dtype))
    return y.reshape(*lead, n)


def _fused_ref(x2, q, scales, zeros, norm_scale, residual, norm, glu, fmt, out_dtype):
    """What `_fused_vjp` computes, in XLA (its backward differentiates this)."""
    from flashit_jax.nn.norms import rms_norm

    bits, packing, n = fmt
    if norm is not None:
        x2 = rms_norm(x2, norm_scale, *norm)
    if glu is not None:
        from flashit_jax.nn.linear import glu_input

        x2 = glu_input(x2, glu)
    w = reference.dequantize(q, scales, zeros, bits=bits, packing=packing, n=n, dtype=jnp.float32)
    y = jnp.dot(x2.astype(jnp.float32), w).astype(out_dtype)
    return y if residual is None else residual + y


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _fused_vjp(x2, q, scales, zeros, norm_scale, residual, interpret, norm, glu, fmt, out_dtype):
    bits, packing, n = fmt
    if packing == "u4x2":
        from kernels.gemv.quant import matvec_q4

        kw = {} if norm is None else dict(norm_scale=norm_scale, eps=norm[0], norm_offset=norm[1])
        return matvec_q4(x2, q, scales, zeros, n=n, offset=reference.code_offset(packing, bits, zeros is not None),
                         out_dtype=out_dtype, glu=glu, residual=residual, interpret=interpret, **kw)
    from kernels.gemv import gpu as gemv_gpu

    kw = {} if norm is None else dict(norm_scale=norm_scale.astype(x2.dtype), eps=norm[0], offset=norm[1])
    return gemv_gpu.matvec(x2, q, out_scale=scales.astype(jnp.float32), out_dtype=out_dtype, glu=glu,
                           residual=residual, interpret=interpret, **kw)


def _fused_fwd(x2, q, scales, zeros, norm_scale, residual, interpret, norm, glu, fmt, out_dtype):
    y = _fused_vjp(x2, q, scales, zeros, norm_scale, residual, interpret, norm, glu, fmt, out_dtype)
    return y, (x2, q, scales, zeros, norm_scale, residual)


def _fused_bwd(interpret, norm, glu, fmt, out_dtype, res, dy):
    x2, q, scales, zeros, norm_scale, residual = res
    _, vjp = jax.vjp(lambda x, g, r: _fused_ref(x, q, scales, zeros, g, r, norm, glu, fmt, out_dtype), x2,
                     norm_scale, residual)
    dx, dg, dr = vjp(dy)
    return dx, _zero_cotangent(q), _zero_cotangent(scales), _zero_cotangent(zeros), dg, dr


_fused_vjp.defvjp(_fused_fwd, _fused_bwd)


def qmatmul_fused(x, q, scales, zeros, *, bits: int, packing: str, n: int, norm=None, glu: str | None = None,
                  residual=None, out_dtype=None, impl: str = "auto"):
    """The decode GEMV with its fusions, where the GEMV route serves W (symmetric per-column int8, or u4x2
    groups), else None (the caller runs them in XLA around `qmatmul`): norm = (scale, eps, offset):
    rms_norm(x) @ W, the norm in the kernel's prologue; glu="silu": x is gate | up and the product's input
    silu(gate) * up; residual: residual + y. Why: a w8 decode step on an H200 ran ~2 norm kernels per layer
    that the bf16 step fuses into its GEMVs (324 against 275 kernels a step, 2026-12-05)."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    k = x.shape[-1] // (2 if glu is not None else 1)
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    if not gemv_fits(m, packing, scales.shape[0], zeros is not None, x.dtype, k, n):
        return None
    if residual is not None and (residual.dtype != out_dtype or residual.shape != (*lead, n)):
        return None
    which = choose(m, k, n, packing, scales.shape[0], x.dtype, impl, has_zeros=zeros is not None)
    if which not in ("gemv", "interpret-gemv"):
        return None
    from kernels.gemv import api as gemv_api
    from kernels.gemv import gpu as gemv_gpu

    if which == "gemv" and not gemv_api.use_norm_kernel(m, x.dtype):
        return None
    if glu is not None and glu not in gemv_gpu.GLUS:
        return None
    scale, statics = (None, None) if norm is None else (norm[0], (float(norm[1]), float(norm[2])))
    r2 = None if residual is None else residual.reshape(m, n)
    y = _fused_vjp(x.reshape(m, x.shape[-1]), q, scales, zeros, scale, r2, which == "interpret-gemv", statics, glu,
                   (bits, packing, n), out_dtype)
    return y.reshape(*lead, n)


def int8_matmul(xq, sx, wq, sw, *, out_dtype=jnp.float32, impl: str = "auto"):
    """W8A8: (xq int8 [..., K] * sx [..., 1]) @ (wq int8 [K, N] * sw [1, N])."""
    if impl not in IMPLS:
        raise ValueError(f"unknown int8_matmul impl {impl!r}; use one of {IMPLS}")
    k, n = wq.shape
    lead = xq.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    use = impl in ("pallas", "interpret") or (impl == "auto" and _backend() == "gpu")
    if use:
        from kernels.qmatmul import gpu

        why = gpu.int8_supported(m, k, n)
        if why and impl == "pallas":
            raise ValueError(f"int8_matmul: {why}")
        if not why:
            y = gpu.int8_matmul(xq.reshape(m, k), sx.reshape(m, 1), wq, sw, out_dtype=out_dtype,
                                interpret=impl == "interpret")
            return y.reshape(*lead, n)
    return reference.int8_matmul(xq, sx, wq, sw, out_dtype=out_dtype)
