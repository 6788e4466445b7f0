"""`TrainConfig`: every knob of a training run, from defaults < YAML file(s) < command-line flags.

    cfg = parse_args(["--config", "train/configs/distill_shakespeare.yaml", "--steps", "100"])

Each field becomes a flag (`seq_len` -> `--seq-len`); `--config FILE` (repeatable) loads YAML
files under `train/configs/` or anywhere. Fields that shape the run (model, data, optimizer,
schedule) are recorded in the run directory; resuming with different values is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from flashit_jax.errors import FlashitError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass
class TrainConfig:
    # what is trained
    model: str = "smollm2-135m"  # finetune: the model to train (any load_model spec)
    student: str = "layers=0,6,12,18,24,29"  # distill: SPEC (YAML, layers=..., or a model spec)
    teacher: str = "smollm2-135m"
    loss: str = "mix"  # ce | hard | soft | fkl | rkl | topk | feature | mix
    kd_loss: str = "soft"  # the KD term of `mix` (hard, soft, fkl, rkl, topk)
    alpha: float = 0.5  # mix: alpha * data CE + (1 - alpha) * KD
    temperature: float = 2.0
    hard_sample: bool = False  # hard: sample the teacher's labels (else argmax)
    topk: int = 32
    topk_cache: str = ""  # directory of the tensorstore top-k cache (default: OUT/topk)
    feature_weight: float = 1.0  # feature: weight of the hidden-state (FitNets) term
    attention_weight: float = 0.0  # feature: weight of the attention-map (TinyBERT) term
    trainable: str = ""  # regex over student parameter paths: train only these (""= all); e.g. "layers/\d+/mixer/.*"
    # data
    data: str = "bundled"
    split: str = "train"
    eval_data: str = ""  # default: `data`
    eval_split: str = "valid"
    seq_len: int = 256
    data_seed: int = 0
    doc_masking: bool = True  # packed documents attend only within themselves (False: nanoGPT-style, needed by cudnn)
    # optimization
    steps: int = 300
    batch_size: int = 8  # global, in sequences, per optimizer step
    accum_steps: int = 1  # micro-batches per step (gradient accumulation)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    compute_dtype: str = "bf16"  # master weights stay fp32
    teacher_dtype: str = ""  # default: compute_dtype
    # fsdp: by the family's rules (split like the student); replicated: a copy per device (no
    # all-gathers: a frozen teacher has no gradients or optimizer state for fsdp to split);
    # auto: replicated when it takes at most 1/16 of a device's memory, else fsdp
    teacher_sharding: str = "auto"
    seed: int = 0
    attn_impl: str = "auto"
    # QAT (finetune): straight-through fake quantization of the matched weights
    qat_bits: int = 0  # 0: off
    qat_group: int = 32
    qat_symmetric: bool = True
    qat_rules: str = r"layers/\d+/(attn|mlp)/\w+/w"
    qat_method: str = "rtn"  # rtn (--qat-bits B) | bitnet (ternary absmean weights x int8 per-token activations)
    # LoRA / QLoRA (finetune): train low-rank adapters on a frozen base
    lora_rank: int = 0  # 0: off
    lora_alpha: float = 16.0
    lora_rules: str = r"layers/\d+/(attn|mlp)/\w+/w"
    lora_base: str = ""  # a quantization recipe for the frozen base (QLoRA), e.g. w4g64; "": float base
    # sharding / hosts
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    distributed: bool = False  # call jax.distributed.initialize (TPU pods / SLURM auto-detect)
    coordinator: str = ""  # host:port, with num_processes / process_id, for a manual multi-process run
    num_processes: int = 0
    process_id: int = -1
    # bookkeeping
    out: str = "out/train"
    ckpt_every: int = 100  # 0: no checkpoints
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    eval_every: int = 100  # 0: only at the end
    eval_ctx: int = 256
    eval_max_chunks: int = 8  # per document, for the periodic evals
    final_eval_max_chunks: int = 0  # 0: same as eval_max_chunks; -1: every chunk
    log_every: int = 10
    progress: bool = True
    save_model: bool = True

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


# Fields that may change when resuming (they do not change what is computed).
RESUMABLE = {"out", "ckpt_every", "keep_checkpoints", "async_checkpoints", "eval_every", "eval_ctx",
             "eval_max_chunks", "final_eval_max_chunks", "log_every", "progress", "save_model", "distributed",
             "coordinator", "num_processes", "process_id", "eval_data", "eval_split", "topk_cache", "attn_impl",
             "teacher_sharding"}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value, typ):
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise FlashitError(f"{name}: expected true/false, got {value!r}")
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise FlashitError(f"{name}: expected {typ.__name__}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.exists() and (CONFIG_DIR / p).exists():
        p = CONFIG_DIR / p
    if not p.exists():
        raise FlashitError(f"config file {str(path)!r} not found (looked here and in {CONFIG_DIR})")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise FlashitError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise FlashitError(f"{p}: expected a mapping of config fields")
    return d


def from_dict(d: dict, base: TrainConfig | None = None) -> TrainConfig:
    types = _field_types()
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise FlashitError(f"unknown config fields: {unknown}")
    return dataclasses.replace(base or TrainConfig(), **{k: _coerce(k, v, types[k]) for k, v in d.items()})


def build_parser(prog: str, description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="YAML file of config fields (repeatable)")
    base = from_dict(defaults or {})
    for name, typ in _field_types().items():
        flag = "--" + name.replace("_", "-")
        default = getattr(base, name)
        if typ is bool:
            ap.add_argument(flag, type=lambda s, n=name: _coerce(n, s, bool), nargs="?", const=True,
                            default=None, metavar="BOOL", help=f"(default {default})")
        else:
            ap.add_argument(flag, type=str, default=None, metavar=typ.__name__.upper(), help=f"(default {default!r})")
    return ap


def parse_args(argv=None, *, prog="train", description="", defaults: dict | None = None) -> TrainConfig:
    ap = build_parser(prog, description, defaults)
    args = ap.parse_args(argv)
    cfg = from_dict(defaults or {})
    for f in args.config:
        cfg = from_dict(load_yaml(f), cfg)
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return from_dict(flags, cfg)


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
