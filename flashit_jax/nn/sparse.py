"""Sparse weight types: pytree nodes that `linear` runs, like QArray.

    MaskedArray(w, mask)       unstructured sparsity: the dense [in, out] matrix and a bool mask
                               (True = kept); linear computes x @ where(mask, w, 0)
    NMArray(values, meta)      N:M sparsity (2:4, 4:8) packed along `in` (kernels.sparse_matmul):
                               n of every m weights stored, plus their in-group positions
    ActSparse(w, threshold)    online pruning: inputs with |x| <= threshold are dropped per token
                               (TEAL-style); at decode the kernel reads only the rows of w that
                               the surviving inputs need

`flashit_jax.prune` makes them; `flashit_jax.prune` also registers their serializers
(`sparsity.json` holds the static fields). The model code does not change.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.nn.linear import WeightOps, register_weight_type
from kernels.sparse_matmul import api as sapi
from kernels.sparse_matmul import reference as sref

_STATIC = dict(static=True)


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=_STATIC)


_IMPL = ["auto"]


@contextlib.contextmanager
def sparse_impl(impl: str):
    """Force the sparse matmul implementation while tracing ("xla", "pallas", "interpret", "auto")."""
    if impl not in sapi.IMPLS:
        raise ValueError(f"unknown sparse matmul impl {impl!r}; use one of {sapi.IMPLS}")
    _IMPL.append(impl)
    try:
        yield
    finally:
        _IMPL.pop()


def _check_in(x, shape, kind):
    if x.shape[-1] != shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but the {kind} weight is {shape} ([in, out])")


def _nbytes(obj) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(obj))


# ----------------------------------------------------------------------------- masked dense
class _DenseBacked:
    """A sparse weight type holding a dense `w` [in, out]: its shape, dtype and size are w's."""

    @property
    def shape(self) -> tuple:
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return _nbytes(self)

    def with_compute_dtype(self, dtype):
        return dataclasses.replace(self, w=self.w.astype(dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskedArray(_DenseBacked):
    w: Any  # [in, out] values; pruned entries are 0 as stored
    mask: Any  # bool [in, out], True where the weight is kept

    @property
    def sparsity(self) -> float:
        return 1.0 - float(jnp.mean(self.mask.astype(jnp.float32)))

    @classmethod
    def create(cls, w, mask) -> "MaskedArray":
        w, mask = jnp.asarray(w), jnp.asarray(mask, bool)
        if w.ndim != 2 or mask.shape != w.shape:
            raise ValueError(f"MaskedArray needs a matrix and a mask of its shape; got {w.shape} and {mask.shape}")
        return cls(jnp.where(mask, w, jnp.zeros((), w.dtype)), mask)

    def dense(self, dtype=None):
        w = jnp.where(self.mask, self.w, jnp.zeros((), self.w.dtype))
        return w if dtype is None else w.astype(dtype)

    def __repr__(self) -> str:
        return f"MaskedArray(shape={self.shape}, dtype={self.dtype})"


def _masked_linear(x, w: MaskedArray):
    _check_in(x, w.shape, "masked")
    return jnp.einsum("...i,io->...o", x, w.dense(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


# ----------------------------------------------------------------------------- N:M packed
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMArray:
    values: Any  # [n, in/m, out]: plane p = the p-th kept weight of every group of m inputs
    meta: Any  # [in/m, out] uint8/16/32: the n in-group positions, ceil(log2 m) bits each
    n: int = _static()
    m: int = _static()
    shape: tuple = _static()  # logical [in, out]

    @classmethod
    def create(cls, values, meta, *, n: int, m: int, shape) -> "NMArray":
        a = cls(values, meta, int(n), int(m), tuple(int(s) for s in shape))
        a.validate()
        return a

    @classmethod
    def from_dense(cls, w, keep, n: int, m: int) -> "NMArray":
        """Pack w [in, out] keeping `keep` (at most n per group of m inputs of each output)."""
        values, meta = sref.nm_compress(jnp.asarray(w), keep, n, m)
        return cls.create(values, meta, n=n, m=m, shape=w.shape)

    def validate(self) -> None:
        sref.check_nm(self.n, self.m)
        k, cols = self.shape
        if k % self.m:
            raise ValueError(f"{self.n}:{self.m} sparsity needs the {k} inputs to be a multiple of {self.m}")
        want = (self.n, k // self.m, cols)
        if tuple(self.values.shape) != want:
            raise ValueError(f"NMArray {self.shape} {self.n}:{self.m}: values are {tuple(self.values.shape)}, "
                             f"expected {want}")
        if tuple(self.meta.shape) != want[1:] or jnp.dtype(self.meta.dtype) != jnp.dtype(sref.meta_dtype(self.n, self.m)):
            raise ValueError(f"NMArray {self.shape} {self.n}:{self.m}: meta is {tuple(self.meta.shape)} "
                             f"{jnp.dtype(self.meta.dtype)}, expected {want[1:]} {jnp.dtype(sref.meta_dtype(self.n, self.m))}")

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return _nbytes(self)

    @property
    def mask(self):
        """bool [in, out]: where a value is stored (a stored value may itself be 0)."""
        return sref.nm_decompress(jnp.ones_like(self.values, jnp.float32), self.meta, self.n, self.m) > 0

    def with_compute_dtype(self, dtype) -> "NMArray":
        return dataclasses.replace(self, values=self.values.astype(dtype))

    def dense(self, dtype=None):
        return sref.nm_decompress(self.values, self.meta, self.n, self.m, dtype)

    def __repr__(self) -> str:
        return f"NMArray(shape={self.shape}, {self.n}:{self.m}, dtype={self.dtype})"


def _nm_linear(x, w: NMArray):
    _check_in(x, w.shape, f"{w.n}:{w.m}")
    return sapi.nm_matmul(x, w.values, w.meta, n=w.n, m=w.m, out_dtype=x.dtype, impl=_IMPL[-1])


# ----------------------------------------------------------------------------- online (activation) pruning
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActSparse(_DenseBacked):
    w: Any  # [in, out] dense weight
    threshold: Any  # fp32 scalar: inputs with |x| <= threshold are dropped

    def dense(self, dtype=None):
        return self.w if dtype is None else self.w.astype(dtype)

    def __repr__(self) -> str:
        return f"ActSparse(shape={self.shape}, dtype={self.dtype})"


def _act_linear(x, w: ActSparse):
    _check_in(x, w.shape, "activation-sparse")
    return sapi.act_sparse_matmul(x, w.w, w.threshold, out_dtype=x.dtype, impl=_IMPL[-1])


register_weight_type(MaskedArray, WeightOps(linear=_masked_linear))
register_weight_type(NMArray, WeightOps(linear=_nm_linear))
register_weight_type(ActSparse, WeightOps(linear=_act_linear))

SPARSE_TYPES = (MaskedArray, NMArray, ActSparse)

__all__ = ["MaskedArray", "NMArray", "ActSparse", "SPARSE_TYPES", "sparse_impl"]
