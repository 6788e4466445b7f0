"""GGUF files (llama.cpp): config from metadata, tensors dequantized with the `gguf` package."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.nn.rope import RopeScaling
from models.llama import LlamaConfig
from models.mixtral import MixtralConfig

# Types we dequantize (the gguf package implements them in numpy); anything else is refused by name.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K"}
ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma"}
# llama.cpp's converter permutes Q/K rows into its interleaved rotary layout for these only.
PERMUTED_ARCHS = {"llama"}

_NAMES = {
    "token_embd.weight": "embed/w",
    "output_norm.weight": "final_norm/scale",
    "output.weight": "lm_head/w",
}
_BLOCK = {
    "attn_q": "attn/q", "attn_k": "attn/k", "attn_v": "attn/v", "attn_output": "attn/o",
    "ffn_gate": "mlp/gate", "ffn_up": "mlp/up", "ffn_down": "mlp/down",
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Mixtral (arch `llama` with `llama.expert_count`): router [E, D] and experts stacked [E, out, in]
# in numpy order; files from before the stacked layout hold one `ffn_gate.{e}` tensor per expert.
_MOE_BLOCK = {
    "ffn_gate_inp": "moe/router", "ffn_gate_exps": "moe/experts/gate", "ffn_up_exps": "moe/experts/up",
    "ffn_down_exps": "moe/experts/down",
}
_PER_EXPERT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


def open_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on bad files
        raise FlashitError(f"{path}: not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}") from None


def field(reader, key: str, default: Any = None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise FlashitError(f"GGUF metadata field {key!r} is unreadable: {e}") from None


def config_from_gguf(reader, path: Path) -> LlamaConfig | MixtralConfig:
    arch = field(reader, "general.architecture")
    if arch not in ARCHS:
        raise FlashitError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {sorted(ARCHS)}")

    def a(key, default=None, required=False):
        v = field(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise FlashitError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    dim = int(a("embedding_length", required=True))
    n_heads = int(a("attention.head_count", required=True))
    n_kv = int(a("attention.head_count_kv", n_heads))
    head_dim = int(a("attention.key_length", 0) or a("rope.dimension_count", 0) or dim // n_heads)
    names = {t.name for t in reader.tensors}
    vocab = a("vocab_size") or len(field(reader, "tokenizer.ggml.tokens", []) or [])
    if not vocab:
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(emb.shape[1])
    scaling = None
    stype = a("rope.scaling.type")
    if stype == "linear":
        scaling = RopeScaling("linear", factor=float(a("rope.scaling.factor", 1.0)))
    elif stype not in (None, "none"):
        raise FlashitError(f"{path}: unsupported rope scaling {stype!r}")
    freq_factors = None
    if "rope_freqs.weight" in names:
        freq_factors = tuple(float(x) for x in _tensor(reader, "rope_freqs.weight"))
    n_experts = int(a("expert_count", 0) or 0)
    if n_experts:
        if arch != "llama":
            raise FlashitError(f"{path}: mixture-of-experts GGUF files are supported for arch `llama` (Mixtral), "
                               f"not {arch!r}")
        ffn = a("feed_forward_length") or a("expert_feed_forward_length")
        if ffn is None:
            raise FlashitError(f"{path}: GGUF metadata lacks {arch}.feed_forward_length")
        return MixtralConfig(
            vocab_size=int(vocab), dim=dim, n_layers=int(a("block_count", required=True)), n_heads=n_heads,
            n_kv_heads=n_kv, ffn_dim=int(ffn), n_experts=n_experts, top_k=int(a("expert_used_count", 2)),
            head_dim=head_dim, norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(a("rope.freq_base", 1e6)), rope_scaling=scaling, rope_freq_factors=freq_factors,
            max_position=int(a("context_length", 32768)), tie_embeddings="output.weight" not in names)
    name = str(field(reader, "general.name", "") or "") + str(field(reader, "general.basename", "") or "")
    family = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma"}[arch]
    if "smollm" in name.lower():
        family = "smollm2"
    return LlamaConfig(
        vocab_size=int(vocab), dim=dim, n_layers=int(a("block_count", required=True)), n_heads=n_heads,
        n_kv_heads=n_kv, ffn_dim=int(a("feed_forward_length", required=True)), head_dim=head_dim,
        norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=scaling, rope_freq_factors=freq_factors,
        max_position=int(a("context_length", 4096)), tie_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2", act="gelu_tanh" if arch == "gemma" else "silu",
        norm_offset=1.0 if arch == "gemma" else 0.0, embed_scale=arch == "gemma", family=family,
    )


def _tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return dequantize(t)


def dequantize(t) -> np.ndarray:
    """float32 numpy array in numpy (row-major) order: GGUF shape reversed."""
    import gguf

    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise FlashitError(f"GGUF tensor {t.name!r} has unsupported type {qtype}; supported: {sorted(SUPPORTED_TYPES)}")
    shape = tuple(int(s) for s in reversed(t.shape))
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise FlashitError(f"GGUF tensor {t.name!r} ({qtype}) could not be decoded: {e}") from None
    if arr.size != int(np.prod(shape)):
        raise FlashitError(f"GGUF tensor {t.name!r}: {arr.size} values for shape {shape} (truncated file?)")
    return np.asarray(arr, np.float32).reshape(shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows ([out, ...], out = heads * head_dim)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path, dtype) -> tuple[LlamaConfig | MixtralConfig, dict[str, np.ndarray], Any]:
    """(config, flat params as numpy `dtype` in our [in, out] layout, reader)."""
    from tqdm.auto import tqdm

    reader = open_reader(path)
    config = config_from_gguf(reader, path)
    arch = field(reader, "general.architecture")
    moe = isinstance(config, MixtralConfig)
    flat: dict[str, np.ndarray] = {}
    per_expert: dict[str, dict[int, np.ndarray]] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", leave=False):
        if moe and _moe_tensor(t, flat, per_expert, dtype):
            continue
        if t.name in _NAMES:
            ours = _NAMES[t.name]
            kind = "weight"
            mod = None
        else:
            m = _BLOCK_RE.fullmatch(t.name)
            if m is None:
                if t.name == "rope_freqs.weight":
                    continue
                raise FlashitError(f"{path}: unknown tensor {t.name!r} for architecture {arch}")
            i, mod, kind = m.groups()
            if mod not in _BLOCK:
                raise FlashitError(f"{path}: unknown tensor {t.name!r} for architecture {arch}")
            base = f"layers/{i}/{_BLOCK[mod]}"
            ours = base + ("/scale" if mod.endswith("norm") else ("/w" if kind == "weight" else "/b"))
        arr = dequantize(t)  # [out, in] for matrices
        if arch in PERMUTED_ARCHS and mod in ("attn_q", "attn_k"):
            arr = unpermute(arr, config.n_heads if mod == "attn_q" else config.n_kv_heads)
        if ours.endswith("/scale") and arch == "gemma":
            arr = arr - 1.0  # llama.cpp's converter stores Gemma norms as (1 + w)
        if arr.ndim == 2 and ours != "embed/w":
            arr = arr.T
        flat[ours] = np.ascontiguousarray(arr).astype(dtype)
    if per_expert:
        flat.update(_stack_per_expert(per_expert, config.n_experts, path))
    return config, flat, reader


def _moe_tensor(t, flat: dict, per_expert: dict, dtype) -> bool:
    """Place a Mixtral router/expert tensor in our layout (router [D, E], experts [E, in, out])."""
    if m := _PER_EXPERT_RE.fullmatch(t.name):
        i, which, e = m.groups()
        per_expert.setdefault(f"layers/{i}/moe/experts/{which}/w", {})[int(e)] = dequantize(t).T.astype(dtype)
        return True
    m = _BLOCK_RE.fullmatch(t.name)
    if m is None or m.group(2) not in _MOE_BLOCK:
        return False
    arr = dequantize(t)
    arr = arr.T if arr.ndim == 2 else arr.swapaxes(1, 2)
    flat[f"layers/{m.group(1)}/{_MOE_BLOCK[m.group(2)]}/w"] = np.ascontiguousarray(arr).astype(dtype)
    return True


def _stack_per_expert(per_expert: dict, n_experts: int, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for name, by_expert in per_expert.items():
        missing = sorted(set(range(n_experts)) - set(by_expert))
        if missing:
            raise FlashitError(f"{path}: {name} lacks experts {missing} (of {n_experts})")
        out[name] = np.ascontiguousarray(np.stack([by_expert[e] for e in range(n_experts)]))
    return out
