"""`load_model(spec)`: one entry point for every source of weights.

spec is a known name (`smollm2-135m`, fetched and cached), `random:SHAPE` (random weights of a
known shape), or a path to a .gguf file, a Hugging Face directory (config.json with
`architectures`) or our own directory (config.json with `format_version`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.loading.checks import check_params
from flashit_jax.loading.native import load_native, register_serializer, save_model
from flashit_jax.loading.resolver import DEFAULT_MODEL, KNOWN, cache_dir, fetch_known
from flashit_jax.loading.tokenizer import Tokenizer, tokenizer_from_dir, tokenizer_from_gguf

_DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
           "fp16": jnp.float16, "float16": jnp.float16}


def parse_dtype(d) -> Any:
    if not isinstance(d, str):
        return jnp.dtype(d).type
    try:
        return _DTYPES[d.lower()]
    except KeyError:
        raise FlashitError(f"unknown dtype {d!r}; use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass
class Loaded:
    model: Any  # models.Model
    params: Any
    tokenizer: Tokenizer | None
    source: str
    note: str = ""
    transforms: list = dataclasses.field(default_factory=list)

    @property
    def config(self):
        return self.model.config


def known_models() -> list[str]:
    from models.configs import SHAPES

    return sorted(KNOWN) + [f"random:{s}" for s in sorted(SHAPES)]


def _np_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)


def _to_device(flat: dict, dtype) -> dict:
    out = {}
    for k, v in flat.items():
        if isinstance(v, np.ndarray):
            v = jnp.asarray(v if v.dtype == _np_dtype(dtype) or v.dtype.kind not in "fc" else v.astype(_np_dtype(dtype)))
        elif hasattr(v, "with_compute_dtype"):  # packed weights (QArray) keep their codes, compute in `dtype`
            v = v.with_compute_dtype(dtype)
        out[k] = v
    return tree.unflatten(out)


def load_model(spec: str = DEFAULT_MODEL, dtype="float32", *, seed: int = 0) -> Loaded:
    from models import Model
    from models.configs import SHAPES

    dtype = parse_dtype(dtype)
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        if shape not in SHAPES:
            raise FlashitError(f"unknown model shape {shape!r}; known: {', '.join(known_models())}")
        model = Model(SHAPES[shape])
        return Loaded(model, model.init_params(jax.random.key(seed), dtype), None, spec,
                      note=f"random weights of the {shape} shape")
    if spec in KNOWN:
        path, note = fetch_known(spec), KNOWN[spec].note
    else:
        path, note = Path(spec).expanduser(), ""
        if not path.exists():
            hint = "" if ("/" in spec or spec.endswith(".gguf")) else f"; known names: {', '.join(known_models())}"
            raise FlashitError(f"unknown model {spec!r}: no such name or path{hint}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FlashitError(f"{path}: expected a .gguf file or a model directory")
        from flashit_jax.loading.gguf_file import load_gguf

        config, flat, reader = load_gguf(path, _np_dtype(dtype))
        model = Model(config)
        check_params(model, flat, str(path))
        return Loaded(model, _to_device(flat, dtype), tokenizer_from_gguf(reader), str(path), note)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FlashitError(f"{path}: no config.json (expected a Hugging Face or flashit_jax model directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FlashitError(f"{cfg_path}: invalid JSON: {e}") from None
    if "format_version" in cfg:
        config, flat, transforms = load_native(path)
        model = Model(config)
        check_params(model, flat, str(path))
        return Loaded(model, _to_device(flat, dtype), tokenizer_from_dir(path), str(path), note, transforms)
    if "architectures" in cfg:
        from flashit_jax.loading.hf import load_hf_dir

        config, flat = load_hf_dir(path, _np_dtype(dtype))
        model = Model(config)
        check_params(model, flat, str(path))
        return Loaded(model, _to_device(flat, dtype), tokenizer_from_dir(path), str(path), note)
    raise FlashitError(f"{cfg_path}: neither `format_version` (flashit_jax) nor `architectures` (Hugging Face)")


def load_tokenizer(spec: str) -> Tokenizer:
    """Only the tokenizer of a model spec (no weights are dequantized)."""
    if spec.startswith("random:"):
        raise FlashitError(f"{spec} has random weights and no tokenizer; pass a real model's tokenizer")
    path = fetch_known(spec) if spec in KNOWN else Path(spec).expanduser()
    if path.is_file():
        from flashit_jax.loading.gguf_file import open_reader

        return tokenizer_from_gguf(open_reader(path))
    tok = tokenizer_from_dir(path) if path.is_dir() else None
    if tok is None:
        raise FlashitError(f"no tokenizer found for {spec!r}")
    return tok


__all__ = ["Loaded", "load_model", "load_tokenizer", "save_model", "register_serializer", "known_models",
           "parse_dtype", "Tokenizer", "cache_dir", "DEFAULT_MODEL"]
