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
from flashit_jax.nn.qarray import QArray, matmul_impl
from flashit_jax.quant.calib import Calibration, InputStats, calibrate, calibration_tokens
from flashit_jax.quant.methods import AWQ, FP8, GPTQ, RTN, LLMInt8, Method, SmoothQuant, W8A8, method_from_dict
from flashit_jax.quant.quantize import quantize, quantize_leaf, size_bytes
from flashit_jax.quant.recipes import EXAMPLES, named_recipe, resolve, rules_to_json


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


def _register():
    from flashit_jax.loading import register_serializer

    register_serializer(QArray, _to_tensors, _from_tensors, sidecar="quant.json")


_register()

__all__ = ["QArray", "matmul_impl", "Calibration", "InputStats", "calibrate", "calibration_tokens", "quantize",
           "quantize_leaf", "size_bytes", "Method", "RTN", "GPTQ", "AWQ", "W8A8", "SmoothQuant", "LLMInt8", "FP8",
           "method_from_dict", "named_recipe", "resolve", "rules_to_json", "EXAMPLES"]
