"""Model families. `Model(config)` binds a config to its family's pure functions.

A family is a module with `forward(params, tokens, positions, cache, *, config, ...)`,
`init_params(config, key, dtype)` and `init_cache(config, batch, max_len, dtype, params=None)`;
it registers its config class with `register_family`.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

_FAMILIES: dict[type, ModuleType] = {}


def register_family(config_cls: type, module: ModuleType) -> None:
    _FAMILIES[config_cls] = module


def family_of(config) -> ModuleType:
    try:
        return _FAMILIES[type(config)]
    except KeyError:
        raise ValueError(f"no model family registered for {type(config).__name__}") from None


@dataclasses.dataclass(frozen=True)
class Model:
    """A config bound to its family; hashable, so it can be a static argument of `jax.jit`."""

    config: Any

    @property
    def family(self) -> ModuleType:
        return family_of(self.config)

    def forward(self, params, tokens, positions=None, cache=None, **kw):
        return self.family.forward(params, tokens, positions, cache, config=self.config, **kw)

    def init_params(self, key, dtype=None):
        import jax.numpy as jnp

        return self.family.init_params(self.config, key, jnp.float32 if dtype is None else dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None, params=None):
        import jax.numpy as jnp

        return self.family.init_cache(self.config, batch, max_len, jnp.bfloat16 if dtype is None else dtype,
                                      params=params)


from models import llama, mamba  # noqa: E402

register_family(llama.LlamaConfig, llama)
register_family(mamba.MambaConfig, mamba)

from models import configs, hybrid, mixtral  # noqa: E402

register_family(mixtral.MixtralConfig, mixtral)
register_family(hybrid.HybridConfig, hybrid)
configs.register_shape("mamba-130m", mamba.MAMBA_130M)
for _pct in (50, 100):  # SmolLM2-135M, half / all attention layers converted (the recipe of docs/hybrid.md: no gate)
    configs.register_shape(f"smollm2-135m-hybrid{_pct}",
                           hybrid.hybrid_shape(configs.SHAPES["smollm2-135m"], _pct / 100, gate=False))

__all__ = ["Model", "register_family", "family_of", "llama", "mamba", "mixtral", "hybrid"]
