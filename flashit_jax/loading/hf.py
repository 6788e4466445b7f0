"""Hugging Face model directories: config.json + one or many *.safetensors (with index)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.rope import RopeScaling
from models.llama import LlamaConfig

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GemmaForCausalLM": "gemma",
}


def _rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 nests everything under rope_parameters; older configs use rope_theta +
    # rope_scaling, whose type key was "type" before "rope_type".
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling("linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), RopeScaling(
            "llama3", factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position=int(scaling["original_max_position_embeddings"]))
    raise FlashitError(f"unsupported rope scaling {kind!r} in config.json (supported: default, linear, llama3)")


def config_from_hf(cfg: dict) -> LlamaConfig:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise FlashitError(f"unsupported architecture {archs} in config.json; supported: "
                           f"{sorted(SUPPORTED) + ['MambaForCausalLM']}")
    family = SUPPORTED[arch]
    theta, scaling = _rope(cfg)
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
    if family == "gemma":
        act = "gelu_tanh"  # HF Gemma uses the tanh approximation whatever hidden_act says
    elif act != "silu":
        raise FlashitError(f"unsupported activation {act!r} for {arch}")
    window = cfg.get("sliding_window")
    if family == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    if family not in ("mistral", "qwen2"):
        window = None
    head_dim = cfg.get("head_dim") or dim // n_heads
    name = cfg.get("_name_or_path", "")
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, ffn_dim=cfg["intermediate_size"],
        head_dim=head_dim, norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma")),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        act=act, norm_offset=1.0 if family == "gemma" else 0.0, embed_scale=family == "gemma",
        sliding_window=window, family="smollm2" if "smollm" in name.lower() else family,
    )


_LAYER = {
    "self_attn.q_proj": "attn/q", "self_attn.k_proj": "attn/k", "self_attn.v_proj": "attn/v",
    "self_attn.o_proj": "attn/o", "mlp.gate_proj": "mlp/gate", "mlp.up_proj": "mlp/up",
    "mlp.down_proj": "mlp/down", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def hf_name_to_path(name: str) -> tuple[str, bool] | None:
    """(our path, transpose?) for an HF tensor name, or None for tensors we don't use."""
    if name == "model.embed_tokens.weight":
        return "embed/w", False
    if name == "model.norm.weight":
        return "final_norm/scale", False
    if name == "lm_head.weight":
        return "lm_head/w", True
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        i, mod, kind = m.groups()
        base = f"layers/{i}/{_LAYER[mod]}"
        if mod.endswith("layernorm"):
            return base + "/scale", False
        return base + ("/w" if kind == "weight" else "/b"), kind == "weight"
    return None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FlashitError(f"{path}: safetensors shard(s) missing: {[m.name for m in missing]}")
    if not files:
        raise FlashitError(f"{path}: no *.safetensors files next to config.json")
    return files


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FlashitError(f"cannot read {path}: {e}") from None


def _llama_tensors(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    mapped = hf_name_to_path(name)
    if mapped is None:
        return []
    ours, transpose = mapped
    return [(ours, arr.T if transpose else arr)]


def _family(cfg: dict):
    """(config_from_hf, convert(name, array) -> [(path, array)]) for the directory's architecture."""
    from flashit_jax.loading import hf_mamba

    if any(a in hf_mamba.ARCHITECTURES for a in cfg.get("architectures") or []):
        return hf_mamba.config_from_hf, hf_mamba.convert
    return config_from_hf, _llama_tensors


def load_hf_dir(path: Path, dtype):
    """(config, flat params as numpy in `dtype`)."""
    cfg = json.loads((path / "config.json").read_text())
    make_config, convert = _family(cfg)
    config = make_config(cfg)
    flat: dict[str, np.ndarray] = {}
    for f in safetensors_files(path):
        for name, arr in read_safetensors(f).items():
            for ours, a in convert(name, arr):
                flat[ours] = np.ascontiguousarray(a).astype(dtype)
    if config.tie_embeddings:
        flat.pop("lm_head/w", None)
    return config, flat

