"""Hugging Face `MambaForCausalLM` directories (state-spaces/mamba-*-hf): config and tensor names."""
from __future__ import annotations

import math
import re

import numpy as np

from flashit_jax.errors import FlashitError
from models.mamba import MambaConfig

ARCHITECTURES = ("MambaForCausalLM",)


def config_from_hf(cfg: dict) -> MambaConfig:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise FlashitError(f"unsupported Mamba activation {act!r} (silu)")
    dim = cfg["hidden_size"]
    rank = cfg.get("time_step_rank", "auto")
    try:
        return MambaConfig(
            vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], d_state=cfg.get("state_size", 16),
            expand=cfg.get("expand", 2), d_inner=cfg.get("intermediate_size") or cfg.get("expand", 2) * dim,
            d_conv=cfg.get("conv_kernel", 4), dt_rank=math.ceil(dim / 16) if rank == "auto" else int(rank),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5), conv_bias=bool(cfg.get("use_conv_bias", True)),
            proj_bias=bool(cfg.get("use_bias", False)), tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            residual_in_fp32=bool(cfg.get("residual_in_fp32", True)))
    except (KeyError, ValueError) as e:
        raise FlashitError(f"invalid Mamba config.json: {e}") from None


_MIXER = {"x_proj.weight": "x_proj/w", "dt_proj.weight": "dt_proj/w", "dt_proj.bias": "dt_proj/b",
          "out_proj.weight": "out_proj/w", "out_proj.bias": "out_proj/b", "A_log": "A_log", "D": "D",
          "conv1d.bias": "conv/bias"}
_LAYER_RE = re.compile(r"(?:backbone\.)?layers\.(\d+)\.(.+)")


def convert(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Our (path, array) pairs for one HF tensor (none for tensors we don't use)."""
    if name in ("backbone.embeddings.weight", "backbone.embedding.weight"):
        return [("embed/w", arr)]
    if name == "backbone.norm_f.weight":
        return [("final_norm/scale", arr)]
    if name == "lm_head.weight":
        return [("lm_head/w", arr.T)]
    m = _LAYER_RE.fullmatch(name)
    if not m:
        return []
    i, rest = m.groups()
    pre = f"layers/{i}/"
    if rest == "norm.weight":
        return [(pre + "norm/scale", arr)]
    if not rest.startswith("mixer."):
        return []
    rest = rest[len("mixer."):]
    if rest in ("in_proj.weight", "in_proj.bias"):  # [x | z] stacked on the output axis
        x, z = np.split(arr, 2, axis=0)
        kind = "w" if rest.endswith("weight") else "b"
        return [(pre + f"mixer/in_x/{kind}", x.T if kind == "w" else x),
                (pre + f"mixer/in_z/{kind}", z.T if kind == "w" else z)]
    if rest == "conv1d.weight":  # [di, 1, k] -> [k, di]
        return [(pre + "mixer/conv/kernel", arr[:, 0, :].T)]
    if rest in _MIXER:
        ours = _MIXER[rest]
        return [(pre + "mixer/" + ours, arr.T if ours.endswith("/w") else arr)]
    return []
