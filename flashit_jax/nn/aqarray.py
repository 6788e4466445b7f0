"""AQArray: a weight matrix stored as AQLM additive codebooks, a pytree node `linear` runs.

Leaves: codes [M, G, N] (uint8 / uint16), codebooks [M, 2^B, d] (fp16), scales [1, N] (fp16);
static: bits B, logical shape ([in, out]) and compute dtype. The format and the two matmul
paths (XLA dequantize + dot; the Pallas lookup kernel for decode) are in `kernels.aqlm`.
`flashit_jax.nn.qarray.matmul_impl` picks the implementation for AQArray too.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.nn.linear import WeightOps, register_weight_type
from flashit_jax.nn.qarray import _IMPL
from kernels.aqlm import api as aqapi
from kernels.aqlm import reference as aqref


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AQArray:
    codes: Any
    codebooks: Any
    scales: Any
    bits: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple = dataclasses.field(metadata=dict(static=True))  # logical [in, out]
    dtype: Any = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, codes, codebooks, scales, *, bits: int, shape, dtype) -> "AQArray":
        a = cls(codes=codes, codebooks=codebooks, scales=scales, bits=int(bits), shape=tuple(int(s) for s in shape),
                dtype=np.dtype(jnp.dtype(dtype)))
        a.validate()
        return a

    def validate(self) -> None:
        """ValueError unless leaves and static fields agree."""
        if len(self.shape) != 2:
            raise ValueError(f"AQArray holds a matrix; got logical shape {self.shape}")
        why = aqref.check_format(self.codes.shape, self.codebooks.shape, self.scales.shape, self.bits,
                                 k=self.shape[0], n=self.shape[1])
        if why:
            raise ValueError(f"AQArray of logical shape {self.shape}: {why}")
        if jnp.dtype(self.codes.dtype) != np.dtype(aqref.code_dtype(self.bits)):
            raise ValueError(f"AQArray codes are {self.codes.dtype}; {self.bits}-bit codes are stored as "
                             f"{np.dtype(aqref.code_dtype(self.bits))}")

    @property
    def num_codebooks(self) -> int:
        return self.codes.shape[0]

    @property
    def group_size(self) -> int:
        return self.codebooks.shape[2]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def with_compute_dtype(self, dtype) -> "AQArray":
        return dataclasses.replace(self, dtype=np.dtype(jnp.dtype(dtype)))

    def dequantize(self, dtype=None):
        return aqref.dequantize(self.codes, self.codebooks, self.scales, dtype or self.dtype)

    def __repr__(self) -> str:
        return (f"AQArray(shape={self.shape}, {self.num_codebooks}x{self.bits} codebooks over {self.group_size} "
                f"weights, dtype={self.dtype})")


def _linear(x, w: AQArray):
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but w is {w.shape} ([in, out])")
    return aqapi.aqlm_matmul(x, w.codes, w.codebooks, w.scales, out_dtype=x.dtype, impl=_IMPL[-1])


register_weight_type(AQArray, WeightOps(linear=_linear))
