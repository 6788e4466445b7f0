"""QArray: a quantized weight matrix as a pytree node that `linear`/`embed`/`unembed` run.

Leaves are the packed codes, the scales and the optional zero offsets; everything else is
static: bits, group size, which logical axis is contracted, logical shape, compute dtype,
packing, and (for W8A8 / LLM.int8) how activations are quantized at run time. Storage is
always "[K, N]" (K = contracted axis, see `kernels.qmatmul.reference`): an `[in, out]` linear
weight is stored as is (axis=0), a `[vocab, dim]` embedding table as [dim, vocab] (axis=1),
so that the tied lm_head (x @ E^T) is the same kernel call as a linear layer.

Quantization groups run along K: `group_size` consecutive K rows share one scale (and zero).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.nn.linear import WeightOps, register_weight_type
from kernels.qmatmul import api as qapi
from kernels.qmatmul import reference as qref

ACT_MODES = (None, "int8", "llm-int8")
_STATIC = dict(static=True)


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=_STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    qvalues: Any  # packed codes [K, packed N] (uint8 / int8 / float8_e4m3fn)
    scales: Any  # [K // group_size, N], or [1, 1] for one scale per tensor
    zeros: Any  # like scales (asymmetric), or None (symmetric)
    bits: int = _static()
    group_size: int = _static()
    axis: int = _static()  # logical axis that is contracted: 0 ([in, out]) or 1 ([vocab, dim])
    shape: tuple = _static()  # logical shape
    dtype: Any = _static()  # compute dtype (np.dtype), what `dequantize()` returns
    packing: str = _static()
    act: str | None = _static(None)  # None (weight-only), "int8" (W8A8), "llm-int8"
    threshold: float = _static(6.0)  # LLM.int8: |x| >= threshold marks an outlier column

    # ------------------------------------------------------------------ construction / checks
    @classmethod
    def create(cls, qvalues, scales, zeros=None, *, bits: int, group_size: int, axis: int, shape, dtype,
               packing: str, act: str | None = None, threshold: float = 6.0) -> "QArray":
        q = cls(qvalues=qvalues, scales=scales, zeros=zeros, bits=int(bits), group_size=int(group_size),
                axis=int(axis), shape=tuple(int(s) for s in shape), dtype=np.dtype(jnp.dtype(dtype)),
                packing=packing, act=act, threshold=float(threshold))
        q.validate()
        return q

    @property
    def k(self) -> int:
        return self.shape[self.axis]

    @property
    def n(self) -> int:
        return self.shape[1 - self.axis]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def groups(self) -> int:
        return self.k // self.group_size

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    def validate(self) -> None:
        """Raise ValueError unless leaves and static fields agree (a wrong file fails loudly)."""
        if len(self.shape) != 2:
            raise ValueError(f"QArray holds a matrix; got logical shape {self.shape}")
        if self.axis not in (0, 1):
            raise ValueError(f"QArray axis must be 0 or 1, got {self.axis}")
        if self.packing not in qref.PACKINGS:
            raise ValueError(f"unknown QArray packing {self.packing!r}; known: {sorted(qref.PACKINGS)}")
        if self.act not in ACT_MODES:
            raise ValueError(f"unknown QArray act mode {self.act!r}; known: {ACT_MODES}")
        k, n = self.k, self.n
        if self.group_size < 1 or k % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the contracted dimension {k}")
        if n % qref.column_multiple(self.packing):
            raise ValueError(f"{self.packing} packs {qref.column_multiple(self.packing)} columns together; "
                             f"{n} columns do not divide evenly")
        want_q = (k, qref.packed_columns(self.packing, n))
        if tuple(self.qvalues.shape) != want_q:
            raise ValueError(f"QArray of logical shape {self.shape}: qvalues are {tuple(self.qvalues.shape)}, "
                             f"expected {want_q} ({self.packing})")
        s_shape = tuple(self.scales.shape)
        if s_shape not in ((self.groups, n), (1, 1)) or (s_shape == (1, 1) and self.group_size != k):
            raise ValueError(f"QArray of logical shape {self.shape}, group size {self.group_size}: scales are "
                             f"{s_shape}, expected {(self.groups, n)}")
        if self.zeros is not None and tuple(self.zeros.shape) != s_shape:
            raise ValueError(f"QArray zeros are {tuple(self.zeros.shape)}, scales {s_shape}")
        if self.act is not None and self.packing != "i8":
            raise ValueError(f"activation quantization ({self.act}) needs int8 weights, not {self.packing}")

    def with_compute_dtype(self, dtype) -> "QArray":
        return dataclasses.replace(self, dtype=np.dtype(jnp.dtype(dtype)))

    # ------------------------------------------------------------------ values
    def dequantize_kn(self, dtype=None):
        """The stored [K, N] orientation, dequantized."""
        return qref.dequantize(self.qvalues, self.scales, self.zeros, bits=self.bits, packing=self.packing,
                               n=self.n, dtype=dtype or self.dtype)

    def dequantize(self, dtype=None):
        """The logical matrix (`shape`), in `dtype` (default: the compute dtype)."""
        w = self.dequantize_kn(dtype)
        return w if self.axis == 0 else w.T

    def __repr__(self) -> str:
        extra = f", act={self.act}" if self.act else ""
        return (f"QArray(shape={self.shape}, bits={self.bits}, group={self.group_size}, packing={self.packing}, "
                f"axis={self.axis}, zeros={self.zeros is not None}, dtype={self.dtype}{extra})")


# ------------------------------------------------------------------ implementation choice
_IMPL = ["auto"]


@contextlib.contextmanager
def matmul_impl(impl: str):
    """Force the quantized matmul implementation while tracing ("xla", "pallas", "interpret", ...)."""
    _IMPL.append(impl)
    try:
        yield
    finally:
        _IMPL.pop()


def current_matmul_impl() -> str:
    """The implementation `matmul_impl` set for code traced now ("auto" outside it)."""
    return _IMPL[-1]


def _matmul_kn(x, w: QArray, out_dtype):
    """x [..., K] @ stored [K, N]."""
    if w.act is None:
        return qapi.qmatmul(x, w.qvalues, w.scales, w.zeros, bits=w.bits, packing=w.packing, n=w.n,
                            out_dtype=out_dtype, impl=_IMPL[-1])
    sw = jnp.broadcast_to(w.scales, (1, w.n))
    impl = "xla" if _IMPL[-1] == "interpret-tpu" else _IMPL[-1]
    if w.act == "int8":
        xq, sx = qref.quantize_rows_int8(x)
        return qapi.int8_matmul(xq, sx, w.qvalues, sw, out_dtype=out_dtype, impl=impl)
    # LLM.int8: input columns where any |x| >= threshold in this batch go through the float path
    # (int8 weights dequantized), the rest through vector-wise int8. Computed as two dense
    # products over complementary column masks, so shapes stay static under jit.
    xf = x.astype(jnp.float32)
    outlier = jnp.any(jnp.abs(xf) >= w.threshold, axis=tuple(range(x.ndim - 1)))
    x_reg = jnp.where(outlier, 0.0, xf)
    xq, sx = qref.quantize_rows_int8(x_reg)
    y = qapi.int8_matmul(xq, sx, w.qvalues, sw, out_dtype=jnp.float32, impl=impl)
    x_out = jnp.where(outlier, x, jnp.zeros_like(x))
    y = y + jnp.einsum("...k,kn->...n", x_out, w.dequantize_kn(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _linear(x, w: QArray):
    if w.axis != 0:
        raise ValueError(f"linear needs an [in, out] weight; this QArray is an embedding table {w.shape}")
    if x.shape[-1] != w.k:
        raise ValueError(f"linear: x has {x.shape[-1]} features but w is {w.shape} ([in, out])")
    return _matmul_kn(x, w, x.dtype)


def _linear_fused(x, w: QArray, *, norm=None, glu=None, residual=None):
    """The decode GEMV with its fusions (see nn.linear) where that route serves w, else None."""
    if w.axis != 0 or w.act is not None or x.shape[-1] != w.k * (2 if glu is not None else 1):
        return None
    return qapi.qmatmul_fused(x, w.qvalues, w.scales, w.zeros, bits=w.bits, packing=w.packing, n=w.n, norm=norm,
                              glu=glu, residual=residual, out_dtype=x.dtype, impl=_IMPL[-1])


def _columns(w: QArray, ids):
    """Dequantized stored columns `ids` (int [T]) -> [K, T] without unpacking the others."""
    q = w.qvalues
    if w.packing in ("i8", "u8", "f8e4m3"):
        codes = q[:, ids].astype(jnp.float32)
    elif w.packing == "u3":
        n = w.n
        lo_n, hi_n = n // 4, n // 8
        lo = (q[:, ids % lo_n] >> ((ids // lo_n) * 2).astype(jnp.uint8)) & 3
        hi = (q[:, lo_n + ids % hi_n] >> (ids // hi_n).astype(jnp.uint8)) & 1
        codes = (lo.astype(jnp.int32) | (hi.astype(jnp.int32) << 2)).astype(jnp.float32)
    else:
        bits, per = qref.PACKINGS[w.packing]
        cols = w.n // per
        codes = ((q[:, ids % cols] >> ((ids // cols) * bits).astype(jnp.uint8)) & ((1 << bits) - 1))
        codes = codes.astype(jnp.float32)
    off = qref.code_offset(w.packing, w.bits, w.zeros is not None)
    if off:
        codes = codes - jnp.float32(off)
    s = w.scales if w.scales.shape[1] == 1 else w.scales[:, ids]
    t = ids.shape[0]
    v = codes.reshape(w.groups, w.group_size, t) * s.astype(jnp.float32)[:, None, :]
    if w.zeros is not None:
        z = w.zeros if w.zeros.shape[1] == 1 else w.zeros[:, ids]
        v = v + z.astype(jnp.float32)[:, None, :]
    return v.reshape(w.k, t)


def _embed(ids, w: QArray):
    if w.axis != 1:
        raise ValueError(f"embed needs a [vocab, dim] table; this QArray is an [in, out] weight {w.shape}")
    flat = ids.reshape(-1).astype(jnp.int32)
    rows = _columns(w, flat).T.astype(w.dtype)
    return rows.reshape(*ids.shape, w.k)


def _unembed(x, w: QArray):
    if w.axis != 1:
        raise ValueError(f"unembed needs a [vocab, dim] table; this QArray is an [in, out] weight {w.shape}")
    if x.shape[-1] != w.k:
        raise ValueError(f"unembed: x has {x.shape[-1]} features but the table is {w.shape} ([vocab, dim])")
    return _matmul_kn(x, w, jnp.float32)


register_weight_type(QArray, WeightOps(linear=_linear, embed=_embed, unembed=_unembed, linear_fused=_linear_fused))
