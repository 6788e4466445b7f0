"""Pieces every model family shares: config (de)serialization and random initialisation."""
from __future__ import annotations

import dataclasses
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


def init_pure_params(module_cls, config, key: jax.Array, dtype) -> dict:
    """Random parameters of `module_cls(config)` as a plain pytree, built under jit (no eager
    per-op dispatch, and no host copy of the weights)."""

    @jax.jit
    def make(key):
        return nnx.to_pure_dict(nnx.state(module_cls(config, rngs=nnx.Rngs(key), dtype=dtype), nnx.Param))

    return make(key)
