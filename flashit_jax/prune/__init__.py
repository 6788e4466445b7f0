"""Pruning as pure transforms of the parameter pytree.

    from flashit_jax.prune import prune, prune_model
    from flashit_jax.quant import calibrate
    calib = calibrate(model, params, tokens)                  # Wanda / SparseGPT / structured need it
    sparse = prune(params, "wanda-50", calib)                 # same tree; matrices become MaskedArray / NMArray
    model2, params2, info = prune_model(model, params, "ffn-25+heads-25", tokens)   # smaller config

Importing this package registers the serializers of the sparse weight types (tensors
`PATH.w`, `PATH.mask` (bits), `PATH.values`, `PATH.meta`, `PATH.threshold` in model.safetensors,
static fields in sparsity.json). See docs/pruning.md.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.sparse import ActSparse, MaskedArray, NMArray, sparse_impl
from flashit_jax.prune.methods import Magnitude, Method, SparseGPT, Wanda, method_from_dict
from flashit_jax.prune.model import prune_model
from flashit_jax.prune.recipes import EXAMPLES, MATRICES, is_structured, named_recipe, resolve, rules_to_json
from flashit_jax.prune.unstructured import densify, masks_of, prune, resparsify, sparsity


def _dtype_name(dt) -> str:
    return np.dtype(jnp.dtype(dt)).name


def _to_tensors(x):
    if isinstance(x, MaskedArray):
        mask = np.asarray(x.mask, bool)
        fields = {"w": np.asarray(x.w), "mask": np.packbits(mask.reshape(-1))}
        meta = {"shape": list(x.shape), "dtype": _dtype_name(x.dtype), "pattern": "unstructured",
                "sparsity": 1.0 - float(mask.mean())}
    elif isinstance(x, NMArray):
        fields = {"values": np.asarray(x.values), "meta": np.asarray(x.meta)}
        meta = {"shape": list(x.shape), "dtype": _dtype_name(x.dtype), "pattern": f"{x.n}:{x.m}", "n": x.n, "m": x.m,
                "sparsity": 1.0 - x.n / x.m}
    else:
        fields = {"w": np.asarray(x.w), "threshold": np.asarray(x.threshold, np.float32).reshape(1)}
        meta = {"shape": list(x.shape), "dtype": _dtype_name(x.dtype), "pattern": "activation"}
    return fields, meta


def _from_tensors(cls):
    def load(fields: dict, meta: dict):
        try:
            shape = tuple(int(s) for s in meta["shape"])
            if cls is MaskedArray:
                size = int(np.prod(shape))
                bits = fields["mask"]
                if fields["w"].shape != shape or bits.size != (size + 7) // 8:
                    raise ValueError(f"w {fields['w'].shape} / mask {bits.size} bytes do not fit shape {shape}")
                mask = np.unpackbits(bits, count=size).reshape(shape).astype(bool)
                return MaskedArray(jnp.asarray(fields["w"]), jnp.asarray(mask))
            if cls is NMArray:
                return NMArray.create(jnp.asarray(fields["values"]), jnp.asarray(fields["meta"]), n=meta["n"],
                                      m=meta["m"], shape=shape)
            if fields["w"].shape != shape:
                raise ValueError(f"w {fields['w'].shape} does not fit shape {shape}")
            return ActSparse(jnp.asarray(fields["w"]), jnp.asarray(fields["threshold"].reshape(()), jnp.float32))
        except (KeyError, TypeError, ValueError) as e:
            raise FlashitError(f"invalid {cls.__name__} in sparsity.json: {e}") from None

    return load


def _register():
    from flashit_jax.loading import register_serializer

    for cls in (MaskedArray, NMArray, ActSparse):
        register_serializer(cls, _to_tensors, _from_tensors(cls), sidecar="sparsity.json")


_register()

__all__ = ["prune", "prune_model", "densify", "masks_of", "resparsify", "sparsity", "Method", "Magnitude", "Wanda",
           "SparseGPT", "method_from_dict", "named_recipe", "resolve", "rules_to_json", "is_structured", "EXAMPLES",
           "MATRICES", "MaskedArray", "NMArray", "ActSparse", "sparse_impl"]
