"""Our model directory: config.json (+ format_version), model.safetensors keyed by parameter
path, transforms.json (the transforms applied, in order) and the tokenizer.

Packed weight types (QArray, sparse) serialize through `register_serializer`: each becomes
several tensors `PATH.FIELD` (e.g. `layers/0/attn/q/w.qvalues`) in model.safetensors, and its
static fields go to the type's sidecar file (`quant.json` for QArray, `sparsity.json` for sparse
weights), keyed by path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flashit_jax import tree
from flashit_jax.errors import FlashitError

FORMAT_VERSION = 1

# type name -> (to_tensors(obj) -> (dict[field, array], dict meta), from_tensors(fields, meta) -> obj, sidecar)
_SERIALIZERS: dict[str, tuple[Callable, Callable, str]] = {}
# modules that register a packed type's serializer when imported (loaded on demand)
_PROVIDERS = {"QArray": "flashit_jax.quant", "TernaryArray": "flashit_jax.quant", "RotatedWeight": "flashit_jax.quant",
              "AQArray": "flashit_jax.quant", "MaskedArray": "flashit_jax.prune", "NMArray": "flashit_jax.prune",
              "ActSparse": "flashit_jax.prune"}


def register_serializer(cls: type, to_tensors: Callable, from_tensors: Callable, sidecar: str) -> None:
    """`sidecar` names the JSON file holding the static fields of every leaf of this type."""
    _SERIALIZERS[cls.__name__] = (to_tensors, from_tensors, sidecar)


def _config_dict(config) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "config_class": type(config).__name__, **config.to_dict()}


def config_from_dict(d: dict[str, Any]):
    from models import _FAMILIES

    d = dict(d)
    version = d.pop("format_version")
    if version > FORMAT_VERSION:
        raise FlashitError(f"model directory has format_version {version}; this flashit_jax reads <= {FORMAT_VERSION}")
    cls_name = d.pop("config_class", "LlamaConfig")
    cls = next((c for c in _FAMILIES if c.__name__ == cls_name), None)
    if cls is None:
        raise FlashitError(f"unknown config class {cls_name!r} in config.json")
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise FlashitError(f"invalid config.json: {e}") from None


def save_model(path, config, params, *, tokenizer=None, transforms: list[dict] | None = None) -> Path:
    """Write our model directory; `load_native(path)` gives back identical params."""
    import jax
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    sidecars: dict[str, dict[str, Any]] = {}
    for name, leaf in tree.flatten(params).items():
        entry = _SERIALIZERS.get(type(leaf).__name__)
        if entry is not None:
            fields, meta = entry[0](leaf)
            sidecars.setdefault(entry[2], {})[name] = {"type": type(leaf).__name__, "fields": sorted(fields),
                                                       **meta}
            for f, arr in fields.items():
                tensors[f"{name}.{f}"] = np.asarray(jax.device_get(arr))
        else:
            tensors[name] = np.asarray(jax.device_get(leaf))
    for stale in {e[2] for e in _SERIALIZERS.values()} - set(sidecars):
        (path / stale).unlink(missing_ok=True)
    for fname, entries in sidecars.items():
        (path / fname).write_text(json.dumps(entries, indent=1))
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(_config_dict(config), indent=2))
    (path / "transforms.json").write_text(json.dumps(transforms or [], indent=2))
    if tokenizer is not None:
        tokenizer.tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": None if tokenizer.bos_id is None else tokenizer.tok.id_to_token(tokenizer.bos_id),
            "eos_token": None if tokenizer.eos_id is None else tokenizer.tok.id_to_token(tokenizer.eos_id),
            "add_bos_token": tokenizer.add_bos}, indent=2))
    return path


def load_native(path: Path):
    """(config, flat params (numpy arrays and packed weights), transforms list)."""
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    config = config_from_dict(cfg)
    st = path / "model.safetensors"
    if not st.exists():
        raise FlashitError(f"{path}: model.safetensors is missing")
    try:
        with safe_open(str(st), framework="numpy") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise FlashitError(f"{st}: cannot read: {e}") from None
    packed: dict[str, dict] = {}
    for sidecar in sorted(path.glob("*.json")):
        if sidecar.name in ("config.json", "transforms.json", "tokenizer.json", "tokenizer_config.json"):
            continue
        entries = json.loads(sidecar.read_text())
        if isinstance(entries, dict) and all(isinstance(v, dict) and "type" in v for v in entries.values()):
            packed.update(entries)
    flat: dict[str, Any] = dict(raw)
    for name, info in packed.items():
        info = dict(info)
        kind, fields = info.pop("type"), info.pop("fields")
        if kind not in _SERIALIZERS and kind in _PROVIDERS:
            import importlib

            importlib.import_module(_PROVIDERS[kind])
        if kind not in _SERIALIZERS:
            raise FlashitError(f"{path}: {name} is a {kind}, which no imported module can read "
                               "(import the module that defines it, e.g. flashit_jax.quant)")
        missing = [f for f in fields if f"{name}.{f}" not in raw]
        if missing:
            raise FlashitError(f"{st}: packed weight {name} lacks tensors {missing}")
        flat[name] = _SERIALIZERS[kind][1]({f: flat.pop(f"{name}.{f}") for f in fields}, info)
    tf = path / "transforms.json"
    transforms = json.loads(tf.read_text()) if tf.exists() else []
    return config, flat, transforms
