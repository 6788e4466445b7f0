"""Quantization as pure transforms of the parameter pytree.

    from flashit_jax.quant import calibrate, quantize
    calib = calibrate(model, params, tokens)            # only GPTQ / AWQ / SmoothQuant need it
    qparams = quantize(params, "w4g64-gptq", calib)     # same tree, matrices become QArray
    logits, _, _ = model.forward(qparams, tokens)       # the unchanged model runs it

Importing this package registers QArray's serializer (`PATH.qvalues`, `PATH.scales`,
`PATH.zeros` in model.safetensors, static fields in quant.json).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.aqarray import AQArray
from flashit_jax.nn.hadamard import RotatedWeight, factor
from flashit_jax.nn.qarray import QArray, matmul_impl
from flashit_jax.quant.calib import Calibration, InputStats, calibrate, calibration_tokens
from flashit_jax.quant.methods import AQLM, AWQ, FP8, GPTQ, RTN, BitNet, LLMInt8, Method, SmoothQuant, W8A8, method_from_dict
from flashit_jax.quant.quantize import quantize, quantize_leaf, size_bytes
from flashit_jax.quant.recipes import EXAMPLES, named_recipe, resolve, rules_to_json
from flashit_jax.quant.ternary import TernaryArray


def _to_tensors(q: QArray):
    fields = {"qvalues": np.asarray(q.qvalues), "scales": np.asarray(q.scales)}
    if q.packing == "f8e4m3":  # safetensors' numpy side has no fp8: store the bytes
        fields["qvalues"] = fields["qvalues"].view(np.uint8)
    if q.zeros is not None:
        fields["zeros"] = np.asarray(q.zeros)
    meta = {"bits": q.bits, "group_size": q.group_size, "axis": q.axis, "shape": list(q.shape),
            "dtype": np.dtype(q.dtype).name, "packing": q.packing, "act": q.act, "threshold": q.threshold}
    return fields, meta


def _from_tensors(fields: dict, meta: dict) -> QArray:
    qv = fields["qvalues"]
    if meta.get("packing") == "f8e4m3":
        qv = qv.view(jnp.float8_e4m3fn)
    try:
        return QArray.create(jnp.asarray(qv), jnp.asarray(fields["scales"]),
                             None if "zeros" not in fields else jnp.asarray(fields["zeros"]),
                             bits=meta["bits"], group_size=meta["group_size"], axis=meta["axis"],
                             shape=tuple(meta["shape"]), dtype=meta["dtype"], packing=meta["packing"],
                             act=meta.get("act"), threshold=meta.get("threshold", 6.0))
    except (KeyError, TypeError, ValueError) as e:
        raise FlashitError(f"invalid quantized tensor in quant.json: {e}") from None


def _rotated_to_tensors(r: RotatedWeight):
    if isinstance(r.inner, QArray):
        fields, meta = _to_tensors(r.inner)
        fields = {f"inner_{k}": v for k, v in fields.items()}
        meta = {"inner_type": "QArray", "inner": meta}
    else:
        fields, meta = {"inner": np.asarray(r.inner)}, {"inner_type": "array"}
    return {"signs": np.asarray(r.signs), **fields}, meta


def _rotated_from_tensors(fields: dict, meta: dict) -> RotatedWeight:
    try:
        if meta["inner_type"] == "QArray":
            inner = _from_tensors({k[len("inner_"):]: v for k, v in fields.items() if k.startswith("inner_")},
                                  meta["inner"])
        else:
            inner = jnp.asarray(fields["inner"])
        signs = np.asarray(fields["signs"])
        if signs.shape != (inner.shape[0],) or not np.all(np.abs(signs) == 1):
            raise ValueError(f"signs {signs.shape} must be +-1 over the {inner.shape[0]} inputs")
        factor(inner.shape[0])
        return RotatedWeight(inner=inner, signs=jnp.asarray(signs, jnp.int8))
    except (KeyError, TypeError, ValueError) as e:
        raise FlashitError(f"invalid Hadamard-rotated tensor in quant.json: {e}") from None


def _aq_to_tensors(a: AQArray):
    return ({"codes": np.asarray(a.codes), "codebooks": np.asarray(a.codebooks), "scales": np.asarray(a.scales)},
            {"bits": a.bits, "shape": list(a.shape), "dtype": np.dtype(a.dtype).name})


def _aq_from_tensors(fields: dict, meta: dict) -> AQArray:
    try:
        return AQArray.create(jnp.asarray(fields["codes"]), jnp.asarray(fields["codebooks"]),
                              jnp.asarray(fields["scales"]), bits=meta["bits"], shape=tuple(meta["shape"]),
                              dtype=meta["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise FlashitError(f"invalid AQLM tensor in quant.json: {e}") from None


def _register():
    from flashit_jax.loading import register_serializer

    register_serializer(QArray, _to_tensors, _from_tensors, sidecar="quant.json")
    from flashit_jax.quant import ternary

    ternary.register_serializer()
    register_serializer(RotatedWeight, _rotated_to_tensors, _rotated_from_tensors, sidecar="quant_rotated.json")
    register_serializer(AQArray, _aq_to_tensors, _aq_from_tensors, sidecar="quant_aqlm.json")


_register()

__all__ = ["QArray", "RotatedWeight", "AQArray", "AQLM", "matmul_impl", "Calibration", "InputStats", "calibrate", "calibration_tokens", "quantize",
           "quantize_leaf", "size_bytes", "Method", "RTN", "GPTQ", "AWQ", "W8A8", "SmoothQuant", "LLMInt8", "FP8",
           "BitNet", "TernaryArray", "method_from_dict", "named_recipe", "resolve", "rules_to_json", "EXAMPLES"]
