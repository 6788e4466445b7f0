"""Quantization-aware training: straight-through fake quantization of chosen weights.

The forward pass sees round-to-nearest per-group quantized weights; the backward pass treats
the rounding as identity (the straight-through estimator, Bengio et al. 2013), so the fp32
master weights learn to sit well on the quantization grid.

BitNet b1.58 (`BitNetQAT`): ternary weights and int8 activations, see flashit_jax/quant/ternary.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flashit_jax import tree
from flashit_jax.errors import FlashitError


@dataclasses.dataclass(frozen=True)
class FakeQuant:
    bits: int = 4
    group: int = 32  # along the input dimension (axis 0 of a [in, out] weight); 0: whole column
    symmetric: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise FlashitError(f"QAT bits must be in 2..8, got {self.bits}")
        if self.group < 0:
            raise FlashitError(f"QAT group size must be >= 0, got {self.group}")


@dataclasses.dataclass(frozen=True)
class BitNetQAT:
    """BitNet b1.58 QAT: ternary absmean weights x int8 per-token activations, both straight-through
    (the matched weights become `flashit_jax.quant.ternary.BitLinearQAT` inside the loss)."""

    per_channel: bool = False


def quantize_dequantize(w: jax.Array, q: FakeQuant) -> jax.Array:
    """RTN per group of `q.group` consecutive input rows of w [in, out]; returns w's dtype.

    symmetric: scale = max|w| / (2^(b-1) - 1), levels -(2^(b-1) - 1) .. 2^(b-1) - 1.
    asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale), levels 0 .. 2^b - 1.
    """
    din = w.shape[0]
    g = din if q.group == 0 else q.group
    if din % g:
        raise FlashitError(f"QAT group size {g} does not divide the input dimension {din}")
    x = w.astype(jnp.float32).reshape(din // g, g, *w.shape[1:])
    tiny = jnp.float32(1e-12)
    if q.symmetric:
        qmax = jnp.float32(2 ** (q.bits - 1) - 1)
        scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True), tiny) / qmax
        deq = jnp.clip(jnp.round(x / scale), -qmax, qmax) * scale
    else:
        qmax = jnp.float32(2 ** q.bits - 1)
        lo, hi = jnp.min(x, axis=1, keepdims=True), jnp.max(x, axis=1, keepdims=True)
        scale = jnp.maximum(hi - lo, tiny) / qmax
        zero = jnp.round(-lo / scale)
        deq = (jnp.clip(jnp.round(x / scale) + zero, 0.0, qmax) - zero) * scale
    return deq.reshape(w.shape).astype(w.dtype)


def fake_quant(w: jax.Array, q: FakeQuant | BitNetQAT):
    """Quantized in the forward pass, identity in the backward pass (straight-through). BitNet:
    a BitLinearQAT weight, whose linear also fake-quantizes its input activations."""
    if isinstance(q, BitNetQAT):
        from flashit_jax.quant.ternary import BitLinearQAT

        return BitLinearQAT(w, q.per_channel)
    return w + jax.lax.stop_gradient(quantize_dequantize(w, q) - w)


def apply(params, rules: list[tuple[str, FakeQuant | None]]):
    """Fake-quantize every weight whose path a rule matches (first match wins; None: keep)."""
    def one(path, w):
        q = tree.first_match(path, rules)
        return w if q is None or getattr(w, "ndim", 0) < 2 else fake_quant(w, q)

    return tree.map_with_path(one, params)


def apply_quantized(params, rules: list[tuple[str, FakeQuant | BitNetQAT | None]]):
    """The weights the QAT forward pass uses, as plain arrays (for evaluation and saving); BitNet:
    packed TernaryArray weights (which also quantize activations, as in training)."""
    def one(path, w):
        q = tree.first_match(path, rules)
        if q is None or getattr(w, "ndim", 0) < 2:
            return w
        if isinstance(q, BitNetQAT):
            from flashit_jax.quant.ternary import quantize_ternary

            return quantize_ternary(w, per_channel=q.per_channel)
        return quantize_dequantize(w, q)

    return tree.map_with_path(one, params)
