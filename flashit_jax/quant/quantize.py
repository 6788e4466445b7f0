"""`quantize(params, recipe, calib=None) -> params`: a pure function on the parameter pytree.

Each parameter path is matched against the recipe's (regex, method) rules with `re.fullmatch`,
first match wins (a rule with method None keeps the tensor as it is). Matched matrices become
QArray leaves; everything else is returned unchanged. AWQ and SmoothQuant first fold their
per-channel scales into the preceding norm / linear (see `smooth`), which changes those float
parameters too, exactly (the float model computes the same function before rounding).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.nn.qarray import QArray
from flashit_jax.quant import rtn
from flashit_jax.quant.calib import Calibration
from flashit_jax.quant.methods import AWQ, FP8, GPTQ, RTN, LLMInt8, Method, SmoothQuant, W8A8
from flashit_jax.quant.recipes import resolve
from kernels.qmatmul import reference as qref

EMBEDDING_TABLES = ("embed/w",)  # [vocab, dim] tables: the contracted axis is 1


def contracted_axis(path: str) -> int:
    return 1 if path in EMBEDDING_TABLES else 0


def _bits_and_group(method: Method, k: int) -> tuple[int, int, bool]:
    """(bits, group size along K, symmetric) of the stored format a method produces."""
    if isinstance(method, (RTN, GPTQ, AWQ)):
        if getattr(method, "per_tensor", False):
            return method.bits, k, True
        return method.bits, method.group_size or k, method.symmetric
    return 8, k, True


def _check(path: str, leaf, method: Method, recipe_name: str) -> None:
    if isinstance(leaf, QArray):
        raise FlashitError(f"{path} is already quantized; quantize the float parameters")
    if getattr(leaf, "ndim", 0) != 2:
        raise FlashitError(f"recipe {recipe_name}: rule {method.describe()} matches {path}, a tensor of shape "
                           f"{tuple(getattr(leaf, 'shape', ()))}; only matrices are quantized")
    axis = contracted_axis(path)
    k, n = leaf.shape[axis], leaf.shape[1 - axis]
    bits, group, symmetric = _bits_and_group(method, k)
    if k % group:
        raise FlashitError(f"recipe {recipe_name}: group size {group} does not divide the input dimension {k} of "
                           f"{path} {tuple(leaf.shape)}")
    if not isinstance(method, FP8):
        mult = qref.column_multiple(qref.packing_for(bits, symmetric))
        if n % mult:
            raise FlashitError(f"recipe {recipe_name}: {bits}-bit codes pack {mult} output columns per byte; "
                               f"{path} {tuple(leaf.shape)} has {n}")
    if isinstance(method, (GPTQ, AWQ)) and path in EMBEDDING_TABLES:
        raise FlashitError(f"{method.name} needs the inputs of a linear layer; {path} is an embedding table "
                           "(use RTN for it)")


def quantize_leaf(path: str, w, method: Method, calib: Calibration | None = None, log: list | None = None) -> QArray:
    """One matrix (logical layout) -> QArray, by `method`."""
    axis = contracted_axis(path)
    dtype = w.dtype
    w_kn = jnp.asarray(w, jnp.float32)
    if axis == 1:
        w_kn = w_kn.T
    k = w_kn.shape[0]
    common = dict(axis=axis, shape=tuple(w.shape), dtype=dtype)
    if isinstance(method, RTN):
        bits, group, sym = _bits_and_group(method, k)
        return rtn.quantize_kn(w_kn, bits=bits, group_size=group, symmetric=sym, scale_dtype=method.scale_dtype,
                               per_tensor=method.per_tensor, **common)
    if isinstance(method, GPTQ):
        from flashit_jax.quant.gptq import gptq_quantize

        q, sol = gptq_quantize(w_kn, calib.get(path).h, bits=method.bits, group_size=method.group_size or k,
                               symmetric=method.symmetric, scale_dtype=method.scale_dtype, damp=method.damp,
                               act_order=method.act_order, clip=method.clip, **common)
        if log is not None:
            log.append({"path": path, "method": "gptq", "obs_loss": float(sol.loss)})
        return q
    if isinstance(method, AWQ):
        from flashit_jax.quant.smooth import awq_clip

        group = method.group_size or k
        clip = None
        if method.clip:
            clip = awq_clip(w_kn, calib.get(path).h, bits=method.bits, group_size=group, symmetric=method.symmetric,
                            scale_dtype=jnp.dtype(method.scale_dtype))
        return rtn.quantize_kn(w_kn, bits=method.bits, group_size=group, symmetric=method.symmetric,
                               scale_dtype=method.scale_dtype, clip=clip, **common)
    if isinstance(method, (W8A8, SmoothQuant)):
        return rtn.quantize_kn(w_kn, bits=8, group_size=k, symmetric=True, scale_dtype="float32", act="int8", **common)
    if isinstance(method, LLMInt8):
        return rtn.quantize_kn(w_kn, bits=8, group_size=k, symmetric=True, scale_dtype="float32", act="llm-int8",
                               threshold=method.threshold, **common)
    if isinstance(method, FP8):
        return rtn.quantize_fp8(w_kn, **common)
    raise FlashitError(f"unknown quantization method {method!r}")


def quantize(params, recipe, calib: Calibration | None = None, *, progress: bool = False, log: list | None = None):
    """Quantized copy of `params` (see module doc). `recipe`: a name (`flashit_jax.quant.recipes`)
    or a list of (regex, Method | None) rules. `calib`: from `calibrate(...)`, for GPTQ, AWQ and
    SmoothQuant. `log` collects per-layer details (GPTQ losses, AWQ/SmoothQuant scales)."""
    from tqdm.auto import tqdm

    from flashit_jax.tree import first_match

    name, rules = resolve(recipe)
    flat = tree.flatten(params)
    assign: dict[str, Method] = {}
    for path, leaf in flat.items():
        method = first_match(path, rules)
        if method is None:
            continue
        _check(path, leaf, method, name)
        assign[path] = method
    if not assign:
        raise FlashitError(f"recipe {name} matches no parameter (paths look like {next(iter(flat), '')!r})")
    needy = sorted({m.name for m in assign.values() if m.needs_calibration})
    if needy and calib is None:
        raise FlashitError(f"recipe {name} uses {', '.join(needy)}, which need calibration data: pass "
                           "calib=flashit_jax.quant.calibrate(model, params, tokens) (CLI: --calib DATA)")
    log = [] if log is None else log
    flat = dict(flat)
    if any(m.smoothing for m in assign.values()):
        from flashit_jax.quant.smooth import apply_smoothing

        cfg = calib.config
        if cfg is None:
            raise FlashitError("smoothing (AWQ, SmoothQuant) needs the model config: calibrate with the model")
        calib = apply_smoothing(flat, assign, calib, n_layers=len(params["layers"]), head_dim=cfg.head_dim,
                                norm_offset=float(getattr(cfg, "norm_offset", 0.0)), log=log)
    for path in tqdm(list(assign), desc=f"quantize {name}", unit="tensor", disable=not progress):
        flat[path] = quantize_leaf(path, flat[path], assign[path], calib, log)
    return tree.unflatten(flat)


def size_bytes(params, float_bytes: int | None = 2) -> int:
    """Bytes of every stored leaf: QArray leaves as stored, float leaves at `float_bytes` each
    (2: as bf16; None: as they are)."""
    total = 0
    for leaf in tree.flatten(params).values():
        if isinstance(leaf, QArray):
            total += leaf.nbytes
        else:
            itemsize = jnp.dtype(leaf.dtype).itemsize
            if float_bytes and jnp.issubdtype(leaf.dtype, jnp.floating):
                itemsize = float_bytes
            total += int(np.prod(leaf.shape)) * itemsize
    return total
