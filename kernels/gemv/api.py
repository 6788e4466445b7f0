"""Chooses the decode matmul: Pallas GEMV on GPUs for a few rows, XLA otherwise.

`FLASHIT_JAX_GEMV=0` turns the kernel off (A/B benchmarks); `=interpret` runs it in Pallas
interpret mode on any backend (tests). Under a multi-device `jax.set_mesh` (tensor-parallel
decoding, `kernels.under_split_mesh`) XLA's dot serves by default; `=partitioned` runs the kernel
there too, each device on its block of the weight (`partitioned.py`, custom_partitioning), which
is opt-in until a multi-GPU benchmark (eval.bench_scaleout) shows it ahead of XLA.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from kernels import under_split_mesh
from kernels.gemv import reference

MAX_ROWS = 8  # the kernel's range (tests run it in interpret mode up to this)
# Rows for which `auto` picks the kernel on a GPU. One: on an H200 (2026-12-04, `kernels.gemv.bench
# --rows 1,5`) the kernel at 5 rows (a speculative verify) ran at 0.30-0.94x XLA's dot on the
# Llama-3.2-1B matrices, while at 1 row it is 1.1-2.8x faster. FLASHIT_JAX_GEMV_MAX_ROWS overrides.
AUTO_MAX_ROWS = 1


def _mode() -> str:
    return os.environ.get("FLASHIT_JAX_GEMV", "auto")


def use_kernel(rows: int, dtype) -> bool:
    mode = _mode()
    if mode == "0" or rows > MAX_ROWS or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return False
    if mode != "interpret" and rows > int(os.environ.get("FLASHIT_JAX_GEMV_MAX_ROWS", AUTO_MAX_ROWS)):
        return False
    if under_split_mesh() and mode not in ("interpret", "partitioned"):
        return False
    return mode == "interpret" or jax.default_backend() == "gpu"


def use_norm_kernel(rows: int, dtype) -> bool:
    """The RMSNorm-fused GEMV has no partitioning rule: off under a split mesh (norm, then GEMV)."""
    return use_kernel(rows, dtype) and not under_split_mesh()


def _grads(x, w, g, transposed: bool):
    w32, x32 = w.astype(jnp.float32), x.astype(jnp.float32)
    if transposed:  # y = x @ e.T
        gx, gw = jnp.einsum("mv,vd->md", g, w32), jnp.einsum("mv,md->vd", g, x32)
    else:  # y = x @ w
        gx, gw = jnp.einsum("mn,kn->mk", g, w32), jnp.einsum("mk,mn->kn", x32, g)
    return gx.astype(x.dtype), gw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matvec(x, w, out_dtype):
    """x [M, K] @ w [K, N] -> [M, N] in out_dtype (fp32 accumulation)."""
    from kernels.gemv import gpu, partitioned

    if under_split_mesh():
        return partitioned.matvec(x, w.astype(x.dtype), interpret=_mode() == "interpret").astype(out_dtype)
    return gpu.matvec(x, w.astype(x.dtype), out_dtype=out_dtype, interpret=_mode() == "interpret")


def _matvec_bwd(out_dtype, res, g):
    return _grads(*res, g.astype(jnp.float32), transposed=False)


matvec.defvjp(lambda x, w, out_dtype: (matvec(x, w, out_dtype), (x, w)), _matvec_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def matvec_norm(x, w, scale, eps: float, offset: float, out_dtype):
    """rms_norm(x, scale, eps, offset) [M, K] @ w [K, N] -> [M, N] in out_dtype, the norm inside the kernel."""
    from kernels.gemv import gpu

    return gpu.matvec(x, w.astype(x.dtype), norm_scale=scale.astype(x.dtype), eps=eps, offset=offset,
                      out_dtype=out_dtype, interpret=_mode() == "interpret")


def _norm_ref(x, w, scale, eps, offset):
    from flashit_jax.nn.norms import rms_norm

    return reference.matvec(rms_norm(x, scale, eps, offset), w.astype(x.dtype))


def _matvec_norm_bwd(eps, offset, out_dtype, res, g):
    _, vjp = jax.vjp(lambda x, w, s: _norm_ref(x, w, s, eps, offset), *res)
    return vjp(g.astype(jnp.float32))


matvec_norm.defvjp(lambda x, w, s, eps, offset, out_dtype: (matvec_norm(x, w, s, eps, offset, out_dtype), (x, w, s)),
                   _matvec_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def matvec_epi(x, w, residual, glu, out_dtype):
    """[residual +] (glu(x) if glu else x) [M, K or 2K] @ w [K, N] -> [M, N] in out_dtype, the gated
    activation in the kernel's prologue and the residual add in its epilogue (kernels.gemv.gpu.matvec)."""
    from kernels.gemv import gpu

    return gpu.matvec(x, w.astype(x.dtype), glu=glu, residual=residual, out_dtype=out_dtype,
                      interpret=_mode() == "interpret")


def _epi_ref(x, w, residual, glu, out_dtype):
    if glu is not None:
        from flashit_jax.nn.linear import glu_input

        x = glu_input(x, glu)
    y = reference.matvec(x, w.astype(x.dtype)).astype(out_dtype)
    return y if residual is None else residual + y


def _matvec_epi_bwd(glu, out_dtype, res, g):
    x, w, residual = res
    _, vjp = jax.vjp(lambda x, w, r: _epi_ref(x, w, r, glu, out_dtype), x, w, residual)
    return vjp(g)


matvec_epi.defvjp(lambda x, w, r, glu, out_dtype: (matvec_epi(x, w, r, glu, out_dtype), (x, w, r)), _matvec_epi_bwd)


@jax.custom_vjp
def matvec_t(x, e):
    """x [M, D] @ e [V, D].T -> fp32 [M, V]."""
    from kernels.gemv import gpu, partitioned

    if under_split_mesh():
        return partitioned.matvec_t(x, e.astype(x.dtype), interpret=_mode() == "interpret")
    return gpu.matvec_t(x, e.astype(x.dtype), interpret=_mode() == "interpret")


matvec_t.defvjp(lambda x, e: (matvec_t(x, e), (x, e)), lambda res, g: _grads(*res, g, transposed=True))

__all__ = ["use_kernel", "matvec", "matvec_norm", "matvec_epi", "matvec_t", "reference"]
