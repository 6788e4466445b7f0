"""Hadamard matrices of sizes m * 2^k (m in 1, 12, 20, 28, 36), their fast transform, and
`RotatedWeight`: a weight whose input is rotated on the fly (QuIP# / QuaRot incoherence).

    H_n = H_m (x) H_{2^k}        Kronecker product; H_{2^k} is Sylvester's, H_m is Paley's
    x @ H_n / sqrt(n)            x reshaped [..., m, 2^k]: a fast Walsh-Hadamard transform
                                 (k butterfly passes) on the last axis, an m x m matmul on the other

Paley's constructions from the quadratic residues mod a prime q: type I (q = 3 mod 4) gives
size q + 1 (12 from 11, 20 from 19), type II (q = 1 mod 4) gives 2(q + 1) (28 from 13, 36 from
17). SmolLM2 needs 576 = 36 * 16 and 1536 = 12 * 128; Llama-3 4096 = 1 * 2^12, 14336 = 28 * 512.

A RotatedWeight holds W' = R^T W with R = diag(signs) H_n / sqrt(n) orthogonal, so
x W = (x R) W': `linear` rotates x, then hands it to the inner weight (a float matrix or a
QArray). Rotating spreads a few large weights over many ("incoherence"), which is what makes
2-3 bit grids lose less.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.linear import WeightOps, linear, register_weight_type

BASES = (1, 12, 20, 28, 36)
_PALEY = {12: (11, 1), 20: (19, 1), 28: (13, 2), 36: (17, 2)}  # size -> (prime q, Paley type)


def factor(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k, m in BASES; FlashitError if n has no such form."""
    n = int(n)
    if n >= 1:
        for m in BASES:
            p = n // m
            if n % m == 0 and p & (p - 1) == 0:
                return m, p
    raise FlashitError(f"no Hadamard matrix of size {n} here: sizes are m * 2^k with m in {BASES} "
                       "(e.g. 64, 576 = 36 * 16, 1536 = 12 * 128, 14336 = 28 * 512)")


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def paley(m: int) -> np.ndarray:
    """Hadamard matrix (entries +-1, H H^T = m I) of size m in {12, 20, 28, 36}."""
    if m not in _PALEY:
        raise FlashitError(f"no Paley construction for size {m} here (known: {sorted(_PALEY)})")
    q, kind = _PALEY[m]
    jac = np.array([[_legendre(j - i, q) for j in range(q)] for i in range(q)], np.int64)  # Jacobsthal
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:] = 1
    c[1:, 1:] = jac
    if kind == 1:  # q = 3 mod 4: C skew-symmetric, H = I + C
        c[1:, 0] = -1
        h = np.eye(q + 1, dtype=np.int64) + c
    else:  # q = 1 mod 4: C symmetric, H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]
        c[1:, 0] = 1
        h = np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                               np.array([[1, -1], [-1, -1]]))
    assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64)), m
    return h


def sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.lru_cache(maxsize=None)
def base_matrix(m: int) -> np.ndarray:
    return np.ones((1, 1), np.int64) if m == 1 else paley(m)


def hadamard_matrix(n: int) -> np.ndarray:
    """The +-1 matrix H_n = H_m (x) H_{2^k} (unnormalized: H H^T = n I)."""
    m, p = factor(n)
    return np.kron(base_matrix(m), sylvester(p))


def fwht(x):
    """x @ H_p along the last axis (p a power of two, Sylvester order), unnormalized."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, p)
        h *= 2
    return x


def transform(x, signs=None):
    """(x * signs) @ H_n / sqrt(n) along the last axis, in fp32 (H_n orthonormal after scaling)."""
    n = x.shape[-1]
    m, p = factor(n)
    x = x.astype(jnp.float32)
    if signs is not None:
        x = x * signs.astype(jnp.float32)
    lead = x.shape[:-1]
    y = fwht(x.reshape(*lead, m, p))
    if m > 1:
        y = jnp.einsum("...ap,ab->...bp", y, jnp.asarray(base_matrix(m), jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, n) * np.float32(1.0 / np.sqrt(n))


def rotation(n: int, signs=None) -> np.ndarray:
    """The orthogonal R = diag(signs) H_n / sqrt(n) as a dense float64 matrix (tests, folding)."""
    r = hadamard_matrix(n).astype(np.float64) / np.sqrt(n)
    return r if signs is None else np.asarray(signs, np.float64)[:, None] * r


def random_signs(n: int, seed: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(n) < 0.5, -1, 1).astype(np.int8)


# ----------------------------------------------------------------------------- the weight type
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RotatedWeight:
    """x @ W computed as (x R) @ W' with W' = R^T W [in, out] stored in `inner`."""

    inner: Any  # [in, out]: float array or any registered weight type (QArray)
    signs: Any  # int8 [in], +-1

    @property
    def shape(self) -> tuple:
        return tuple(self.inner.shape)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    def with_compute_dtype(self, dtype) -> "RotatedWeight":
        inner = self.inner.with_compute_dtype(dtype) if hasattr(self.inner, "with_compute_dtype") \
            else self.inner.astype(dtype)
        return dataclasses.replace(self, inner=inner)

    def dequantize(self, dtype=None):
        """The logical W = R W' [in, out]."""
        w = self.inner.dequantize(jnp.float32) if hasattr(self.inner, "dequantize") else self.inner
        w = jnp.asarray(w, jnp.float32)
        # R W' = (W'^T R^T)^T and x R^T = transform^-1: rotate the columns of W'^T back
        n = w.shape[0]
        m, p = factor(n)
        lead = (w.shape[1],)
        y = w.T.reshape(*lead, m, p)
        y = fwht(y)  # H_p is symmetric
        if m > 1:
            y = jnp.einsum("...bp,ab->...ap", y, jnp.asarray(base_matrix(m), jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        y = y.reshape(*lead, n) * np.float32(1.0 / np.sqrt(n)) * self.signs.astype(jnp.float32)
        return y.T.astype(dtype or self.dtype)

    def __repr__(self) -> str:
        return f"RotatedWeight({self.inner!r}, hadamard {factor(self.shape[0])})"


def _rotated_linear(x, w: RotatedWeight):
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but w is {w.shape} ([in, out])")
    return linear(transform(x, w.signs).astype(x.dtype), w.inner)


register_weight_type(RotatedWeight, WeightOps(linear=_rotated_linear))
