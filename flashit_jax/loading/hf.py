"""Hugging Face model directories: config.json + one or many *.safetensors (with index)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.rope import RopeScaling
from models.llama import LlamaConfig
from models.mixtral import MixtralConfig

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GemmaForCausalLM": "gemma",
    "MixtralForCausalLM": "mixtral",
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


def _arch(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise FlashitError(f"unsupported architecture {archs} in config.json; supported: "
                           f"{sorted(SUPPORTED) + ['MambaForCausalLM']}")
    return arch


def mixtral_config_from_hf(cfg: dict) -> MixtralConfig:
    theta, scaling = _rope(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise FlashitError(f"unsupported activation {cfg['hidden_act']!r} for MixtralForCausalLM")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return MixtralConfig(
        vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, ffn_dim=cfg["intermediate_size"],
        n_experts=cfg.get("num_local_experts", 8), top_k=cfg.get("num_experts_per_tok", 2),
        head_dim=cfg.get("head_dim") or dim // n_heads, norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta,
        rope_scaling=scaling, max_position=cfg.get("max_position_embeddings", 32768),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), sliding_window=cfg.get("sliding_window"),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)))


def config_from_hf(cfg: dict) -> LlamaConfig | MixtralConfig:
    arch = _arch(cfg)
    family = SUPPORTED[arch]
    if family == "mixtral":
        return mixtral_config_from_hf(cfg)
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
# Mixtral, as saved by transformers (per expert: w1 gate, w3 up, w2 down; all [out, in]) ...
_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_ROUTER_RE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
# ... or in transformers' in-memory layout: gate_up_proj [E, 2F, D], down_proj [E, D, F]
_FUSED_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_W = {"w1": "gate", "w3": "up", "w2": "down"}


def _moe_tensor(name: str, arr: np.ndarray, flat: dict, per_expert: dict) -> bool:
    """Place a Mixtral expert/router tensor (our layouts: router [D, E], experts [E, in, out])."""
    if m := _ROUTER_RE.fullmatch(name):
        flat[f"layers/{m.group(1)}/moe/router/w"] = arr.T
    elif m := _EXPERT_RE.fullmatch(name):
        i, e, w = m.groups()
        per_expert.setdefault(f"layers/{i}/moe/experts/{_W[w]}/w", {})[int(e)] = arr.T
    elif m := _FUSED_RE.fullmatch(name):
        base = f"layers/{m.group(1)}/moe/experts"
        if m.group(2) == "down_proj":
            flat[base + "/down/w"] = arr.swapaxes(1, 2)
        else:
            f = arr.shape[1] // 2
            flat[base + "/gate/w"] = arr[:, :f].swapaxes(1, 2)
            flat[base + "/up/w"] = arr[:, f:].swapaxes(1, 2)
    else:
        return False
    return True


def _stack_experts(per_expert: dict, n_experts: int, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for name, by_expert in per_expert.items():
        missing = sorted(set(range(n_experts)) - set(by_expert))
        if missing:
            raise FlashitError(f"{path}: {name} lacks experts {missing} (of {n_experts})")
        out[name] = np.stack([by_expert[e] for e in range(n_experts)])
    return out


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


def _load_converted(path: Path, dtype, config, convert):
    """Families with their own tensor mapping: convert(name, array) -> [(our path, array)]."""
    flat: dict[str, np.ndarray] = {}
    for f in safetensors_files(path):
        for name, arr in read_safetensors(f).items():
            for ours, a in convert(name, arr):
                flat[ours] = np.ascontiguousarray(a).astype(dtype)
    if config.tie_embeddings:
        flat.pop("lm_head/w", None)
    return config, flat


def load_hf_dir(path: Path, dtype) -> tuple[LlamaConfig | MixtralConfig, dict[str, np.ndarray]]:
    """(config, flat params as numpy in `dtype`)."""
    from flashit_jax.loading import hf_mamba

    cfg = json.loads((path / "config.json").read_text())
    if any(a in hf_mamba.ARCHITECTURES for a in cfg.get("architectures") or []):
        return _load_converted(path, dtype, hf_mamba.config_from_hf(cfg), hf_mamba.convert)
    config = config_from_hf(cfg)
    moe = isinstance(config, MixtralConfig)
    flat: dict[str, np.ndarray] = {}
    per_expert: dict[str, dict[int, np.ndarray]] = {}
    for f in safetensors_files(path):
        for name, arr in read_safetensors(f).items():
            if moe and _moe_tensor(name, arr, flat, per_expert):
                continue
            mapped = hf_name_to_path(name)
            if mapped is None:
                continue
            ours, transpose = mapped
            flat[ours] = np.ascontiguousarray(arr.T if transpose else arr).astype(dtype)
    if moe:
        flat.update(_stack_experts(per_expert, config.n_experts, path))
        for k in [k for k in flat if "/moe/" in k]:
            flat[k] = np.ascontiguousarray(flat[k]).astype(dtype)
    if config.tie_embeddings:
        flat.pop("lm_head/w", None)
    return config, flat

