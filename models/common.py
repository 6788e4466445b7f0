"""Pieces every model family shares: config (de)serialization and random initialisation."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from flashit_jax.nn.rope import RopeScaling


def config_from_dict(cls, d: dict[str, Any]):
    """A frozen config dataclass from its `to_dict()`; unknown fields are an error, not ignored."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("rope_freq_factors") is not None:
        d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
    return cls(**d)


def layer_list(modules: list):
    # nnx.List arrived in flax 0.12; older NNX took a plain list of modules
    return nnx.List(modules) if hasattr(nnx, "List") else modules


HOST_INIT_MAX_BYTES = 16 << 30


def _make_init(module_cls, config, dtype):
    @jax.jit
    def make(key):
        return nnx.to_pure_dict(nnx.state(module_cls(config, rngs=nnx.Rngs(key), dtype=dtype), nnx.Param))

    return make


# One jitted init per (family, config, dtype): a new closure per call would recompile the whole random init
# (seconds on a CPU even for a tiny model) every time the same model is built again in a process.
_make_init_cached = functools.lru_cache(maxsize=32)(_make_init)


def _init_fn(module_cls, config, dtype):
    try:
        return _make_init_cached(module_cls, config, dtype)
    except TypeError:  # a config with an unhashable field: no reuse
        return _make_init(module_cls, config, dtype)


def init_pure_params(module_cls, config, key: jax.Array, dtype, host_init: bool | None = None) -> dict:
    """Random parameters of `module_cls(config)` as a plain pytree, built under jit (no eager
    per-op dispatch).

    host_init: build them on the host CPU and copy them to the default device. Default: on GPUs,
    for models up to 16 GiB. XLA's GPU compiler turns each parameter's random init into its own
    kernels, and on an H100 (jax 0.11.2) building the 272 tensors of SmolLM2-135M took 116 s
    (Llama-3.2-1B ~60 s) before any benchmark could start; the CPU does it in seconds, and the
    values are the same (threefry is backend-independent)."""

    make = _init_fn(module_cls, config, dtype)
    if host_init is None:
        shapes = jax.eval_shape(make, key)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
        host_init = jax.default_backend() == "gpu" and nbytes <= HOST_INIT_MAX_BYTES
    if not host_init:
        return make(key)
    cpu = jax.devices("cpu")[0]
    params = make(jax.device_put(key, cpu))
    return jax.device_put(params, jax.devices()[0])
