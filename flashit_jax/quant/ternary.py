"""BitNet b1.58 (Ma et al. 2024): ternary {-1, 0, +1} weights with absmean scaling, int8 activations.

Two weight types, both pytree nodes that `nn.linear` dispatches on (the model is unchanged):

- `BitLinearQAT(w)`: the fp32/bf16 master weight during quantization-aware training. Its linear
  quantizes the activations per token to int8 (absmax) and the weight to t * mean|W|, both with
  the straight-through estimator (forward quantized, backward identity), so gradients reach w.
  `train.qat` wraps the matched weights in it inside the loss (the optimizer sees plain arrays).
- `TernaryArray`: the packed model: 2-bit codes (four a byte, `kernels.ternary.reference`) and
  one fp32 scale per tensor; its linear runs int8 x ternary with int32 accumulation
  (`kernels.ternary.api`: the Pallas kernel on GPU, XLA elsewhere). It computes what the QAT
  forward pass computes, up to float rounding order.

    qparams = quantize(params, "bitnet")   # post-training ternarization (no QAT: far from usable)
    python -m train.finetune --qat-method bitnet ...   # QAT from a pretrained model

Only linear layers are ternarized (embedding and tied head stay in float, as in BitNet).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.linear import WeightOps, register_weight_type
from kernels.ternary import api as tapi
from kernels.ternary import reference as tref

_STATIC = dict(static=True)


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=_STATIC)


def _no_table(*_):
    raise FlashitError("ternary (BitNet) weights are for linear layers; keep embedding tables in float")


# ----------------------------------------------------------------------------- packed (inference)
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TernaryArray:
    packed: Any  # uint8 [K, N/4]
    scale: Any  # fp32 [1, 1] (per tensor, BitNet) or [1, N]
    shape: tuple = _static()  # logical [in, out]
    dtype: Any = _static()  # compute dtype of dequantize()

    @classmethod
    def create(cls, packed, scale, *, shape, dtype) -> TernaryArray:
        t = cls(packed=packed, scale=scale, shape=tuple(int(s) for s in shape), dtype=np.dtype(jnp.dtype(dtype)))
        t.validate()
        return t

    def validate(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"TernaryArray holds a matrix; got logical shape {self.shape}")
        k, n = self.shape
        if n % tref.PER_BYTE:
            raise ValueError(f"ternary packing puts {tref.PER_BYTE} columns in a byte; N={n} does not divide")
        if tuple(self.packed.shape) != (k, n // tref.PER_BYTE):
            raise ValueError(f"TernaryArray {self.shape}: packed is {tuple(self.packed.shape)}, expected "
                             f"{(k, n // tref.PER_BYTE)}")
        if tuple(self.scale.shape) not in ((1, 1), (1, n)):
            raise ValueError(f"TernaryArray {self.shape}: scale is {tuple(self.scale.shape)}, expected (1, 1) or (1, {n})")

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    def values(self):
        """The ternary codes t [K, N] (int8)."""
        return tref.unpack(self.packed, self.shape[1])

    def dequantize(self, dtype=None):
        return (self.values().astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype or self.dtype)

    def __repr__(self) -> str:
        return f"TernaryArray(shape={self.shape}, scale={tuple(self.scale.shape)}, dtype={self.dtype})"


_IMPL = ["auto"]


def set_impl(impl: str):
    """Force the ternary matmul implementation while tracing (tests: "interpret")."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        _IMPL.append(impl)
        try:
            yield
        finally:
            _IMPL.pop()

    return cm()


def _ternary_linear(x, w: TernaryArray):
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but w is {w.shape} ([in, out])")
    return tapi.linear(x, w.packed, w.scale, n=w.shape[1], out_dtype=x.dtype, impl=_IMPL[-1])


register_weight_type(TernaryArray, WeightOps(linear=_ternary_linear, embed=_no_table, unembed=_no_table))


def quantize_ternary(w, *, per_channel: bool = False) -> TernaryArray:
    """One [in, out] matrix -> TernaryArray by absmean (per tensor; per output column if asked)."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise FlashitError(f"ternary quantization takes a matrix, got shape {tuple(w.shape)}")
    if w.shape[1] % tref.PER_BYTE:
        raise FlashitError(f"ternary packing puts {tref.PER_BYTE} output columns in a byte; {tuple(w.shape)} has "
                           f"{w.shape[1]}")
    t, s = tref.absmean_ternary(w, axis=0 if per_channel else None)
    return TernaryArray.create(tref.pack(t), s.reshape(1, -1), shape=w.shape, dtype=w.dtype)


# ----------------------------------------------------------------------------- QAT (training)
def ste(x, q):
    """q in the forward pass, gradient of x in the backward pass."""
    return x + jax.lax.stop_gradient(q - x)


def fake_ternary(w, per_channel: bool = False):
    """Straight-through absmean ternarization: forward t * s, backward identity (w's dtype)."""
    t, s = tref.absmean_ternary(w, axis=0 if per_channel else None)
    return ste(w, (t.astype(jnp.float32) * s).astype(w.dtype))


def fake_int8_rows(x):
    """Straight-through per-token absmax int8 of activations (x's dtype)."""
    xq, sx = tref.quantize_rows_int8(x)
    return ste(x, (xq.astype(jnp.float32) * sx).astype(x.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BitLinearQAT:
    w: Any  # float master weight [in, out]
    per_channel: bool = _static(False)

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self) -> int:
        return 2


def _qat_linear(x, w: BitLinearQAT):
    xq = fake_int8_rows(x)
    wq = fake_ternary(w.w, w.per_channel).astype(x.dtype)
    return jnp.einsum("...i,io->...o", xq, wq, preferred_element_type=jnp.float32).astype(x.dtype)


register_weight_type(BitLinearQAT, WeightOps(linear=_qat_linear, embed=_no_table, unembed=_no_table))


def _to_tensors(t: TernaryArray):
    return ({"packed": np.asarray(t.packed), "scale": np.asarray(t.scale)},
            {"shape": list(t.shape), "dtype": np.dtype(t.dtype).name, "format": "bitnet-b1.58 u2x4 (code = t + 1)"})


def _from_tensors(fields: dict, meta: dict) -> TernaryArray:
    try:
        return TernaryArray.create(jnp.asarray(fields["packed"]), jnp.asarray(fields["scale"]),
                                   shape=tuple(meta["shape"]), dtype=meta["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise FlashitError(f"invalid ternary tensor in ternary.json: {e}") from None


def register_serializer():
    from flashit_jax.loading import register_serializer as reg

    reg(TernaryArray, _to_tensors, _from_tensors, sidecar="ternary.json")
