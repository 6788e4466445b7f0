"""`grouped_matmul`: one entry point, choosing the implementation, with a custom VJP.

impl:
  "xla"     jax.lax.ragged_dot (the reference; XLA's own gradient)
  "triton"  Pallas lowered through Triton (kernels/grouped_matmul/gpu.py)
  "tpu"     Pallas TPU, megablox style (kernels/grouped_matmul/tpu.py)
  "auto"    "triton" on GPUs (when K and N are multiples of 16), "tpu" on TPUs, else "xla"

Backward of every Pallas path: d_lhs = grouped_matmul(d_out, rhs^T) and d_rhs[g] =
lhs_g^T @ d_out_g (tgmm), both with the same kernels; group sizes get no gradient.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.grouped_matmul import common, reference

IMPLS = ("auto", "xla", "triton", "tpu")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    impl: str
    block_sizes: common.BlockSizes | None
    interpret: bool
    out_dtype: object


def _forward(cfg: _Cfg, lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None):
    kw = dict(transpose_rhs=transpose_rhs, out_dtype=out_dtype, interpret=cfg.interpret)
    if cfg.block_sizes is not None:
        kw["block_sizes"] = cfg.block_sizes
    if cfg.impl == "triton":
        from kernels.grouped_matmul import gpu
        return gpu.gmm(lhs, rhs, group_sizes, **kw)
    if cfg.impl == "tpu":
        from kernels.grouped_matmul import tpu
        return tpu.gmm(lhs, rhs, group_sizes, **kw)
    raise ValueError(f"unknown grouped matmul impl {cfg.impl!r}; known: {IMPLS}")


def _rhs_grad(cfg: _Cfg, lhs, dout, group_sizes, num_groups, out_dtype):
    kw = dict(num_groups=num_groups, out_dtype=out_dtype, interpret=cfg.interpret)
    if cfg.impl == "tpu":
        from kernels.grouped_matmul import tpu
        if cfg.block_sizes is not None:
            kw["block_sizes"] = cfg.block_sizes
        return tpu.tgmm(lhs, dout, group_sizes, **kw)
    from kernels.grouped_matmul import gpu
    return gpu.tgmm(lhs, dout, group_sizes, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg: _Cfg, lhs, rhs, group_sizes):
    return _forward(cfg, lhs, rhs, group_sizes, out_dtype=cfg.out_dtype)


def _gmm_fwd(cfg, lhs, rhs, group_sizes):
    return _gmm(cfg, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)
    d_lhs = _forward(cfg, dout, rhs.astype(lhs.dtype), group_sizes, transpose_rhs=True, out_dtype=lhs.dtype)
    d_rhs = _rhs_grad(cfg, lhs, dout, group_sizes, rhs.shape[0], rhs.dtype)
    return d_lhs, d_rhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def default_impl(k: int, n: int, dtype) -> str:
    backend = jax.default_backend()
    fits = common.supported(k, n) and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16, jnp.float32)
    if backend == "gpu" and fits:
        return "triton"
    if backend == "tpu" and fits:
        return "tpu"
    return "xla"


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, impl: str = "auto",
                   block_sizes: common.BlockSizes | None = None, interpret: bool = False, precision=None):
    """out[r] = lhs[r] @ rhs[g(r)] for rows r of group g (groups contiguous from row 0);
    rows past sum(group_sizes) are zero. lhs [M, K], rhs [G, K, N], group_sizes int32 [G].
    `interpret` runs the Pallas kernels on CPU (tests)."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"grouped_matmul: lhs [M, K], rhs [G, K, N], group_sizes [G]; got {lhs.shape}, "
                         f"{rhs.shape}, {group_sizes.shape}")
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; known: {IMPLS}")
    k, n = rhs.shape[1], rhs.shape[2]
    if impl == "auto":
        impl = default_impl(k, n, lhs.dtype) if not interpret else "triton"
    if impl == "xla":
        return reference.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes, precision=precision,
                                    preferred_element_type=preferred_element_type)
    if not common.supported(k, n):
        raise ValueError(f"grouped_matmul impl {impl!r} needs K and N multiples of 16, got K={k}, N={n}")
    out_dtype = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    return _gmm(_Cfg(impl, block_sizes, interpret, out_dtype), lhs, rhs.astype(lhs.dtype),
                group_sizes.astype(jnp.int32))
