"""LoRA / QLoRA: low-rank adapters as a pure transform of the parameter pytree.

    adapters = lora.init_adapters(params, [(r"layers/\\d+/(attn|mlp)/\\w+/w", lora.LoRA(rank=8))], key)
    adapted = lora.attach(params, adapters)    # matched weights become LoRAWeight(base, a, b)
    logits, _, _ = model.forward(adapted, tokens)   # the unchanged model runs it
    merged = lora.merge(adapted, jnp.bfloat16)  # plain arrays again: W + scale * A @ B

y = x @ W + scale * (x @ A) @ B, with A [in, r], B [r, out] and scale = alpha / r (Hu et al.
2021). B starts at zero, so a freshly attached model computes exactly the base model.
The base may be any weight type `nn.linear` runs: a float matrix (LoRA) or a QArray (QLoRA,
Dettmers et al. 2023: the frozen base stays 4-bit, only A and B are trained in bf16/fp32).
`merge` always gives float weights (the base dequantized); quantizing the merged model again
is a separate, explicit step (`flashit_jax.quant.quantize`), because it rounds the adapter's
contribution away where it is smaller than a quantization step.

Adapters are a plain nested dict `{..., "q": {"w": {"a": A, "b": B}}}` mirroring the parameter
paths, so the optimizer, checkpoints and safetensors see ordinary arrays.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.nn.linear import WeightOps, _ops, linear, register_weight_type


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int = 8
    alpha: float = 16.0
    init: str = "kaiming"  # A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default); "gaussian": N(0, 1/r)

    def __post_init__(self):
        if self.rank < 1:
            raise FlashitError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.init not in ("kaiming", "gaussian"):
            raise FlashitError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


_STATIC = dict(static=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
    """A frozen base weight [in, out] (array or packed weight type) plus a low-rank update."""

    base: Any
    a: Any  # [in, r]
    b: Any  # [r, out]
    scale: float = dataclasses.field(default=1.0, metadata=_STATIC)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def rank(self) -> int:
        return self.a.shape[1]


def _lora_linear(x, w: LoRAWeight):
    y = linear(x, w.base)
    # The low-rank path in x's dtype with fp32 accumulation, like the dense path.
    h = jnp.einsum("...i,ir->...r", x, w.a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    d = jnp.einsum("...r,ro->...o", h, w.b.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + jnp.float32(w.scale) * d).astype(x.dtype)


def _no_table(*_):
    raise FlashitError("LoRA adapts linear layers ([in, out] weights); an embedding table cannot carry one "
                       "(exclude embed/w from the LoRA rules)")


register_weight_type(LoRAWeight, WeightOps(linear=_lora_linear, embed=_no_table, unembed=_no_table))


def _rules(rules) -> list[tuple[str, LoRA | None]]:
    out = []
    for item in rules:
        try:
            pattern, cfg = item
        except (TypeError, ValueError):
            raise FlashitError(f"LoRA rules are (regex, LoRA | None) pairs; got {item!r}") from None
        try:
            re.compile(pattern)
        except re.error as e:
            raise FlashitError(f"LoRA rule {pattern!r} is not a valid regex: {e}") from None
        if cfg is not None and not isinstance(cfg, LoRA):
            raise FlashitError(f"LoRA rule {pattern!r}: {cfg!r} is not a LoRA config")
        out.append((pattern, cfg))
    return out


def init_adapters(params, rules, key: jax.Array, dtype=jnp.float32) -> dict:
    """Adapters {path...: {"a": A [in, r], "b": zeros [r, out]}} for every matrix a rule matches."""
    rules = _rules(rules)
    flat = tree.flatten(params)
    out = {}
    for i, (path, w) in enumerate(flat.items()):
        cfg = tree.first_match(path, rules)
        if cfg is None:
            continue
        if path == "embed/w" or len(getattr(w, "shape", ())) != 2:
            raise FlashitError(f"LoRA rule matches {path} {tuple(getattr(w, 'shape', ()))}: adapters go on linear "
                               "layers' [in, out] matrices only")
        if isinstance(w, LoRAWeight):
            raise FlashitError(f"{path} already carries a LoRA adapter")
        din, dout = w.shape
        k = jax.random.fold_in(key, i)
        if cfg.init == "kaiming":
            bound = 1.0 / math.sqrt(din)
            a = jax.random.uniform(k, (din, cfg.rank), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (din, cfg.rank), jnp.float32) / cfg.rank
        out[f"{path}/a"] = a.astype(dtype)
        out[f"{path}/b"] = jnp.zeros((cfg.rank, dout), dtype)
    if not out:
        raise FlashitError(f"LoRA rules {[p for p, _ in rules]} match no matrix (paths look like "
                           f"{next(iter(flat), '')!r})")
    return tree.unflatten(out)


def adapter_paths(adapters) -> list[str]:
    """The adapted weights' paths (each has an `a` and a `b`)."""
    return sorted({p.rsplit("/", 1)[0] for p in tree.flatten(adapters)})


def attach(params, adapters, scale: float | dict[str, float]):
    """params with each adapted matrix replaced by LoRAWeight(base, a, b, scale). `scale`: alpha/r,
    one float or {path: float}. Pure; the base arrays are shared, not copied."""
    flat = dict(tree.flatten(params))
    ad = tree.flatten(adapters)
    for path in adapter_paths(adapters):
        if path not in flat:
            raise FlashitError(f"adapter for {path}, which the parameters do not have")
        base = flat[path]
        if isinstance(base, LoRAWeight):
            raise FlashitError(f"{path} already carries a LoRA adapter")
        a, b = ad[f"{path}/a"], ad[f"{path}/b"]
        din, dout = tuple(base.shape)
        if a.shape[0] != din or b.shape[1] != dout or a.shape[1] != b.shape[0]:
            raise FlashitError(f"adapter for {path} {(din, dout)}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit")
        s = scale[path] if isinstance(scale, dict) else scale
        flat[path] = LoRAWeight(base, a, b, float(s))
    return tree.unflatten(flat)


def scale_of(rules, adapters) -> dict[str, float]:
    """{path: alpha / r} for the adapters, from the rules that made them."""
    rules = _rules(rules)
    return {p: tree.first_match(p, rules).scale for p in adapter_paths(adapters)}


def _dense(base):
    ops = _ops(base)
    if ops is None:
        return base.astype(jnp.float32)
    if not hasattr(base, "dequantize"):
        raise FlashitError(f"cannot merge a LoRA adapter into a {type(base).__name__} base (no dequantize())")
    return base.dequantize(jnp.float32)


def merge_weight(w: LoRAWeight, dtype=jnp.bfloat16):
    """W + scale * A @ B in fp32, then `dtype` (a quantized base is dequantized first)."""
    delta = jnp.float32(w.scale) * (w.a.astype(jnp.float32) @ w.b.astype(jnp.float32))
    return (_dense(w.base) + delta).astype(dtype)


def merge(params, dtype=jnp.bfloat16):
    """Every LoRAWeight folded into a plain `dtype` matrix; other leaves unchanged."""
    return tree.map_with_path(lambda _, w: merge_weight(w, dtype) if isinstance(w, LoRAWeight) else w, params)


def detach(params):
    """(base params, adapters, {path: scale}): the inverse of `attach`."""
    flat = tree.flatten(params)
    base, ad, scales = {}, {}, {}
    for path, w in flat.items():
        if isinstance(w, LoRAWeight):
            base[path] = w.base
            ad[f"{path}/a"], ad[f"{path}/b"] = w.a, w.b
            scales[path] = w.scale
        else:
            base[path] = w
    return tree.unflatten(base), tree.unflatten(ad), scales


def n_adapter_params(adapters) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def parse_rules(pattern: str, rank: int, alpha: float) -> list[tuple[str, LoRA]]:
    """CLI form: one regex, one rank and alpha."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise FlashitError(f"--lora-rules {pattern!r}: invalid regex: {e}") from None
    return [(pattern, LoRA(rank=rank, alpha=alpha))]


def save_adapters(path, adapters, meta: dict | None = None):
    """Adapters to safetensors (`PATH/a`, `PATH/b` keys; `meta` as string metadata)."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(v, np.float32) for k, v in tree.flatten(adapters).items()}, str(path),
              metadata={"lora": json.dumps(meta or {})})
    return path


def load_adapters(path) -> tuple[dict, dict]:
    """(adapters, meta) from `save_adapters`."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = json.loads((f.metadata() or {}).get("lora", "{}"))
    return tree.unflatten(flat), meta
