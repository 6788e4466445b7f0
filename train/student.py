"""Student models for distillation, from a SPEC:

- `layers=0,5,10,15,20,25`: the teacher's layers at those indices (re-indexed 0..k-1), with the
  teacher's embeddings, final norm and head: a shallower student initialised from the teacher.
- a YAML file (under train/configs/ or a path) with one of
    layers: [0, 5, 10]                  # as above
    config: {n_layers: 6, dim: 384, ...}  # teacher config with these fields replaced, random init
    model: SPEC                         # any `load_model` spec (e.g. a smaller pretrained model)
  and optionally `init: random` with `layers` (same shape, random weights).
- `hybrid=50%` / `hybrid=0.5` (a fraction of the layers) or `hybrid=1,3,5` (layer indices): the teacher with those attention
  layers converted to Mamba mixers (`models.hybrid.from_llama`), or a YAML file with
    hybrid: {fraction: 0.5, d_conv: 4, gate: true, mixer_norm: true, conv_act: silu,
             dt_range: [0.001, 0.1], a_range: [1, 16], norm_init: 1.0}   # or layers: [1, 3, 5]
- any model spec `load_model` accepts (`random:smollm2-135m`, a directory, a .gguf).

The student must share the teacher's vocabulary (distillation compares distributions token by token).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from flashit_jax.errors import FlashitError
from train.config import CONFIG_DIR, load_yaml


@dataclasses.dataclass
class Student:
    model: object  # models.Model
    params: dict
    description: str
    teacher_layers: tuple[int, ...] | None = None  # which teacher layer each student layer came from
    tokenizer: object = None


def parse_layers(text, n_teacher: int) -> tuple[int, ...]:
    items = text if isinstance(text, (list, tuple)) else [s for s in str(text).split(",") if s.strip()]
    try:
        layers = tuple(int(s) for s in items)
    except ValueError:
        raise FlashitError(f"student layers must be integers, got {text!r}") from None
    if not layers:
        raise FlashitError("student layers: empty list")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise FlashitError(f"student layers {bad} out of range: the teacher has {n_teacher} layers (0..{n_teacher - 1})")
    if len(set(layers)) != len(layers):
        raise FlashitError(f"student layers repeat an index: {list(layers)}")
    return layers


def from_teacher_layers(teacher_model, teacher_params, layers: tuple[int, ...]):
    """(model, params) of the student made of `layers` of the teacher (params shared, not copied)."""
    from models import Model

    config = dataclasses.replace(teacher_model.config, n_layers=len(layers))
    params = {k: v for k, v in teacher_params.items() if k != "layers"}
    params["layers"] = {j: teacher_params["layers"][i] for j, i in enumerate(layers)}
    return Model(config), params


def check_vocab(student_model, teacher_model, student_tok=None, teacher_tok=None) -> None:
    sv, tv = student_model.config.vocab_size, teacher_model.config.vocab_size
    if sv != tv:
        raise FlashitError(f"student vocabulary ({sv} tokens) differs from the teacher's ({tv}): distillation "
                           "needs the same tokenizer")
    if student_tok is not None and teacher_tok is not None and student_tok.tok.get_vocab() != teacher_tok.tok.get_vocab():
        raise FlashitError("student and teacher tokenizers differ (same size, different tokens): distillation "
                           "needs the same tokenizer")


HYBRID_KEYS = {"fraction", "layers", "d_conv", "gate", "mixer_norm", "conv_act", "dt_range", "a_range", "norm_init"}


def hybrid_student(d: dict, teacher_model, teacher_params, *, seed: int = 0) -> Student:
    """The teacher with chosen attention layers converted to Mamba mixers (`models.hybrid.from_llama`)."""
    from models import Model, hybrid
    from models.llama import LlamaConfig

    if not isinstance(d, dict):
        raise FlashitError(f"hybrid: expected a mapping with `fraction` or `layers`, got {d!r}")
    unknown = set(d) - HYBRID_KEYS
    if unknown:
        raise FlashitError(f"hybrid: unknown fields {sorted(unknown)} (known: {sorted(HYBRID_KEYS)})")
    if ("fraction" in d) == ("layers" in d):
        raise FlashitError("hybrid: give exactly one of `fraction` (0..1) and `layers` (indices)")
    if type(teacher_model.config) is not LlamaConfig:
        raise FlashitError(f"a hybrid student converts a Llama-family teacher, not {type(teacher_model.config).__name__}")
    n = teacher_model.config.n_layers
    if "fraction" in d:
        try:
            fraction = float(d["fraction"])
        except (TypeError, ValueError):
            raise FlashitError(f"hybrid: fraction must be a number in [0, 1], got {d['fraction']!r}") from None
        layers = hybrid.convert_layers(n, fraction)
    else:
        layers = parse_layers(d["layers"], n)
    kw = {k: d[k] for k in ("d_conv", "gate", "mixer_norm", "conv_act", "norm_init") if k in d}
    for k in ("dt_range", "a_range"):
        if k in d:
            try:
                lo, hi = (float(v) for v in d[k])
            except (TypeError, ValueError):
                raise FlashitError(f"hybrid: {k} must be two numbers [low, high], got {d[k]!r}") from None
            kw[k] = (lo, hi)
    config, params = hybrid.from_llama(teacher_model.config, teacher_params, layers, key=jax.random.key(seed), **kw)
    desc = f"hybrid: layers {list(config.mamba_layers)} of {n} converted to Mamba mixers"
    return Student(Model(config), params, desc, tuple(range(n)))


def build_student(spec: str, teacher_model, teacher_params, *, seed: int = 0, teacher_tokenizer=None) -> Student:
    from models import Model

    n_teacher = teacher_model.config.n_layers
    if spec.startswith("hybrid="):  # hybrid=50% or hybrid=0.5: a fraction; hybrid=1,3,5: layer indices
        arg = spec[len("hybrid="):].strip()
        if arg.endswith("%") or "." in arg:
            try:
                fraction = float(arg[:-1]) / 100 if arg.endswith("%") else float(arg)
            except ValueError:
                raise FlashitError(f"--student {spec!r}: expected hybrid=50%, hybrid=0.5 or hybrid=1,3,5") from None
            return hybrid_student({"fraction": fraction}, teacher_model, teacher_params, seed=seed)
        return hybrid_student({"layers": arg}, teacher_model, teacher_params, seed=seed)
    if spec.startswith("layers="):
        layers = parse_layers(spec[len("layers="):], n_teacher)
        model, params = from_teacher_layers(teacher_model, teacher_params, layers)
        return Student(model, params, f"teacher layers {list(layers)}", layers)
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or (CONFIG_DIR / spec).suffix in (".yaml", ".yml"):
        d = load_yaml(spec)
        unknown = set(d) - {"layers", "config", "model", "init", "hybrid"}
        if unknown:
            raise FlashitError(f"{spec}: unknown student fields {sorted(unknown)} (layers, config, model, init, hybrid)")
        if sum(k in d for k in ("layers", "config", "model", "hybrid")) != 1:
            raise FlashitError(f"{spec}: give exactly one of `layers`, `config`, `model`, `hybrid`")
        if "hybrid" in d:
            return hybrid_student(d["hybrid"], teacher_model, teacher_params, seed=seed)
        init = d.get("init", "teacher" if "layers" in d else "random")
        if init not in ("teacher", "random"):
            raise FlashitError(f"{spec}: init must be `teacher` or `random`, got {init!r}")
        if "layers" in d:
            layers = parse_layers(d["layers"], n_teacher)
            model, params = from_teacher_layers(teacher_model, teacher_params, layers)
            if init == "random":
                params = model.init_params(jax.random.key(seed))
            return Student(model, params, f"teacher layers {list(layers)} ({init} init)", layers)
        if "config" in d:
            if not isinstance(d["config"], dict):
                raise FlashitError(f"{spec}: `config` must map teacher config fields to new values")
            try:
                cfg = dataclasses.replace(teacher_model.config, **d["config"])
            except (TypeError, ValueError) as e:
                raise FlashitError(f"{spec}: invalid student config: {e}") from None
            model = Model(cfg)
            check_vocab(model, teacher_model)
            return Student(model, model.init_params(jax.random.key(seed)), f"random init, {d['config']}")
        spec = str(d["model"])
    from flashit_jax.loading import load_model

    loaded = load_model(spec, "float32", seed=seed)
    check_vocab(loaded.model, teacher_model, loaded.tokenizer, teacher_tokenizer)
    return Student(loaded.model, loaded.params, f"model {spec}", tokenizer=loaded.tokenizer)
