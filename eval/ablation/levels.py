"""Acceleration levels: small adapters over the project's public transforms, in one registry.

A level is one of
- a pytree transform (quantize, prune, online pruning, another model: a student or a hybrid),
- a runtime option (Pallas kernels, an int8 KV cache),
- a decoding strategy (prompt lookup, speculative decoding, Medusa).
A row of the ablation is a *stack* of levels joined with '+' (`w4-gptq+wanda-50+lookup`); they
are applied in stage order (source, prune, quant, runtime, decode), whatever order they are
written in, so that `lookup+w8` and `w8+lookup` are the same row. A level whose module is not
importable here (a branch not merged yet), whose directory was not given, or that cannot run on
this device is reported as unavailable in its row; nothing is imported before it is needed.

Generic levels: `quant:RECIPE` (any `flashit_jax.quant` recipe) and `prune:RECIPE` (any
unstructured / N:M `flashit_jax.prune` recipe).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from flashit_jax.errors import FlashitError

STAGES = ("source", "prune", "quant", "runtime", "decode")


@dataclasses.dataclass
class Decoding:
    """How a row decodes: plain `generate`, or a drafter verified by the target."""

    kind: str  # "lookup" | "speculative" | "medusa"
    gamma: int
    make: Callable[[Any, Any], Any]  # (model, params) -> drafter (Lookup, Draft, Medusa heads)
    what: str


@dataclasses.dataclass
class Built:
    """A model as a row runs it: what the levels of its stack have made of the baseline."""

    model: Any
    params: Any
    tokenizer: Any
    kernels: bool = False  # Pallas kernels (attention, GEMV, qmatmul) and fused projections
    cache_dtype: str | None = None  # None: the compute dtype
    decoding: Decoding | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def replace(self, **kw) -> "Built":
        return dataclasses.replace(self, notes=list(self.notes), **kw)


@dataclasses.dataclass(frozen=True)
class Level:
    name: str
    stage: str
    what: str
    apply: Callable[["Built", Any, "Level"], Built]  # (built, env, level) -> built
    needs: tuple[str, ...] = ()  # modules that must import (the level's code lives there)
    arg: str | None = None  # the CLI option that must be given (student, hybrid, medusa)
    calibrated: bool = False  # uses calibration data (GPTQ, SmoothQuant, Wanda, ...)
    speed_twin: str | None = None  # a calibration-free level of the same shapes and formats
    on_cpu: bool = True  # False: reported as skipped on CPU
    real_weights_for_speed: bool = False  # speed depends on the weights' values (acceptance)
    recipe: str | None = None  # quant / prune recipe name


def _check_module(mod: str) -> str | None:
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and mod.startswith(e.name):
            return f"needs {mod}, which this checkout does not have (its branch is not merged yet)"
        return f"needs {mod}, which fails to import: {e}"
    return None


# ----------------------------------------------------------------------------- adapters
def _has_sparse(params) -> bool:
    from flashit_jax import tree

    return any(type(x).__module__ == "flashit_jax.nn.sparse" for x in tree.flatten(params).values())


def _quantize(b: Built, env, level: Level) -> Built:
    import jax

    from flashit_jax.quant import quantize, resolve

    params = b.params
    pruned = None
    if _has_sparse(params):
        from flashit_jax.prune import densify

        params = densify(params)  # quantize takes plain matrices; the zeros go into the dense codes
        pruned = _zeros(params)
    _, rules = resolve(level.recipe)
    calib = None
    if any(m is not None and m.needs_calibration for _, m in rules):
        calib = env.calibration(b.model, params)
    q = jax.block_until_ready(quantize(params, level.recipe, calib, progress=env.progress))
    out = b.replace(params=q)
    if pruned:
        kept = _zeros(q, pruned)
        total = sum(int(z.sum()) for z in pruned.values())
        # GPTQ's error compensation writes into pruned weights; RTN keeps a zero a zero (symmetric codes)
        out.notes.append(f"quantized after pruning into dense codes (no sparse x quantized format): "
                         f"{100.0 * kept / max(total, 1):.0f}% of the pruned weights are still zero")
    return out


def _zeros(params, where: dict | None = None):
    """Zero count of each 2-D weight (where=None: {path: count}); with `where` (a previous call's
    result), the number of those positions still zero now, summed."""
    import jax.numpy as jnp
    import numpy as np

    from flashit_jax import tree
    from flashit_jax.nn.qarray import QArray

    flat = tree.flatten(params)
    if where is None:
        out = {}
        for path, w in flat.items():
            if path.startswith("layers/") and hasattr(w, "ndim") and w.ndim == 2 and not isinstance(w, QArray):
                z = np.asarray(w == 0)
                if z.any():
                    out[path] = z
        return out
    kept = 0
    for path, z in where.items():
        w = flat[path]
        w = w.dequantize(jnp.float32) if isinstance(w, QArray) else w
        kept += int(np.sum(np.asarray(w == 0) & z))
    return kept
def _prune(b: Built, env, level: Level) -> Built:
    import jax

    from flashit_jax.prune import is_structured, prune_model, resolve

    if is_structured(level.recipe):  # a smaller config: heads, FFN channels or layers removed
        model, params, _ = prune_model(b.model, b.params, level.recipe, env.calibration_tokens(b.model),
                                       progress=env.progress)
        return b.replace(model=model, params=params)
    _, rules = resolve(level.recipe)
    calib = env.calibration(b.model, b.params) if any(m is not None and m.needs_calibration for _, m in rules) else None
    _, params, _ = prune_model(b.model, b.params, level.recipe, calib=calib, progress=env.progress)
    return b.replace(params=jax.block_until_ready(params))


def _online(b: Built, env, level: Level) -> Built:
    from flashit_jax.prune.online import activation_stats, online_prune, thresholds, uniform_fractions

    fraction = float(level.name.split("-", 1)[1]) / 100.0
    stats = activation_stats(b.model, b.params, env.calibration_tokens(b.model), progress=env.progress)
    return b.replace(params=online_prune(b.params, thresholds(stats, uniform_fractions(stats, fraction))))


def _kernels(b: Built, env, level: Level) -> Built:
    from flashit_jax import tree

    out = b.replace(kernels=True)
    plain = all(type(x).__module__.startswith(("jax", "numpy")) for x in tree.flatten(b.params).values())
    fuse = getattr(b.model.family, "fuse_projections", None)
    if plain and fuse is not None:
        out.params = fuse(b.params, b.model.config)
    else:
        out.notes.append("projections not fused (packed weights or a family without fused layout)")
    return out


def _kv_int8(b: Built, env, level: Level) -> Built:
    return b.replace(cache_dtype="int8")


def random_like(spec: str, dtype: str):
    """Random weights in the shape of `spec`: `random:SHAPE`, a known shape name, or a model
    directory / its config.json (only the config is read: the accelerator mode ships no weights)."""
    import json
    from pathlib import Path

    import jax

    from flashit_jax.loading import Loaded, load_model
    from flashit_jax.loading.native import config_from_dict
    from models import Model
    from models.configs import SHAPES

    if spec.startswith("random:"):
        return load_model(spec, dtype)
    if spec in SHAPES:
        return load_model("random:" + spec, dtype)
    p = Path(spec)
    cfg = p / "config.json" if p.is_dir() else p
    if cfg.suffix == ".json" and cfg.is_file():
        d = json.loads(cfg.read_text())
        if "format_version" not in d:
            raise FlashitError(f"{cfg}: not a flashit_jax model config (no format_version)")
        model = Model(config_from_dict(d))
        dt = {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
        return Loaded(model, model.init_params(jax.random.key(0), jax.numpy.dtype(dt)), None, spec,
                      note=f"random weights in the shape of {cfg}")
    raise FlashitError(f"random weights need a shape: {spec} is not random:SHAPE, a known shape "
                       f"({', '.join(sorted(SHAPES))}) or a model directory / config.json")


def _source(arg: str):
    def apply(b: Built, env, level: Level) -> Built:
        from flashit_jax.loading import load_model

        path = getattr(env, arg)
        loaded = random_like(path, env.dtype) if env.random_weights else load_model(path, env.dtype)
        tok = loaded.tokenizer or b.tokenizer
        if b.tokenizer is not None and tok.vocab_size != b.tokenizer.vocab_size:
            raise FlashitError(f"--{arg} {path}: vocabulary {tok.vocab_size} differs from the model's "
                               f"{b.tokenizer.vocab_size}; perplexities would not compare")
        return b.replace(model=loaded.model, params=loaded.params, tokenizer=tok)

    return apply


def _lookup(b: Built, env, level: Level) -> Built:
    from flashit_jax.decoding import Lookup

    return b.replace(decoding=Decoding("lookup", env.lookup_gamma, lambda m, p: Lookup(ngram=3, min_ngram=1),
                                       f"prompt lookup (n-grams 3..1, {env.lookup_gamma} drafts per step)"))


def _speculative(b: Built, env, level: Level) -> Built:
    from flashit_jax.decoding import Draft, layer_skip_draft

    if env.draft:
        from flashit_jax.loading import load_model

        d = load_model(env.draft, env.dtype)

        def make(m, p):
            return Draft(d.model, d.params, note=env.draft)

        what = f"speculative, draft {env.draft}"
    else:
        layers = env.draft_layers

        def make(m, p):
            return layer_skip_draft(m, p, layers)

        what = f"self-speculation, draft = target layers {layers}"
    return b.replace(decoding=Decoding("speculative", env.spec_gamma, make, f"{what}, {env.spec_gamma} drafts per step"))


def _medusa(b: Built, env, level: Level) -> Built:
    import jax.numpy as jnp

    from flashit_jax.decoding.medusa import load_heads

    heads, _ = load_heads(env.medusa, jnp.bfloat16 if env.dtype == "bf16" else jnp.float32)
    return b.replace(decoding=Decoding("medusa", 0, lambda m, p: heads, f"Medusa heads from {env.medusa}, tree 4x2x1"))


# ----------------------------------------------------------------------------- registry
_PRUNE = ("flashit_jax.prune",)
_DECODING = ("flashit_jax.decoding",)


def _quant_level(name, recipe, what, twin=None, calibrated=False):
    return Level(name, "quant", what, _quantize, needs=("flashit_jax.quant",), calibrated=calibrated,
                 speed_twin=twin, recipe=recipe)


def _prune_level(name, recipe, what, twin=None, calibrated=True):
    return Level(name, "prune", what, _prune, needs=_PRUNE, calibrated=calibrated, speed_twin=twin, recipe=recipe)


REGISTRY: dict[str, Level] = {lv.name: lv for lv in [
    Level("baseline", "source", "the model as loaded, XLA ops", lambda b, env, lv: b),
    Level("kernels", "runtime", "Pallas kernels (attention, decode GEMV, quantized matmul) + fused q|k|v, gate|up",
          _kernels, on_cpu=False),
    _quant_level("w8", "w8", "int8 weights, per channel (RTN)"),
    _quant_level("w4", "w4g64", "4-bit weights, groups of 64 (RTN)"),
    _quant_level("w4-gptq", "w4g64-gptq", "4-bit weights, groups of 64 (GPTQ)", twin="w4", calibrated=True),
    _quant_level("w4-awq", "w4g64-awq", "4-bit weights, groups of 64 (AWQ)", twin="w4", calibrated=True),
    _quant_level("w8a8", "w8a8", "int8 weights x int8 activations"),
    _quant_level("smoothquant", "w8a8-smoothquant", "SmoothQuant (alpha 0.5), int8 weights x int8 activations",
                 twin="w8a8", calibrated=True),
    _quant_level("fp8", "fp8", "fp8 e4m3 weights, per channel"),
    Level("kv-int8", "runtime", "int8 KV cache (scale per token and head)", _kv_int8),
    _prune_level("magnitude-50", "magnitude-50", "50% of each matrix by |w|", calibrated=False),
    _prune_level("wanda-50", "wanda-50", "Wanda, 50% unstructured", twin="magnitude-50"),
    _prune_level("sparsegpt-50", "sparsegpt-50", "SparseGPT, 50% unstructured", twin="magnitude-50"),
    _prune_level("magnitude-2:4", "magnitude-2:4", "2:4 by |w|", calibrated=False),
    _prune_level("2:4", "wanda-2:4", "Wanda, 2:4 semi-structured", twin="magnitude-2:4"),
    Level("online-50", "prune", "online pruning: 50% of each linear's inputs dropped per token (TEAL-style)",
          _online, needs=_PRUNE, calibrated=True, real_weights_for_speed=True),
    Level("lookup", "decode", "prompt lookup decoding (greedy output unchanged)", _lookup, needs=_DECODING,
          real_weights_for_speed=True),
    Level("speculative", "decode", "speculative decoding (greedy output unchanged)", _speculative, needs=_DECODING,
          real_weights_for_speed=True),
    Level("medusa", "decode", "Medusa heads, typical acceptance", _medusa, needs=_DECODING, arg="medusa",
          real_weights_for_speed=True),
    Level("student", "source", "distilled student (train.distill)", _source("student"), arg="student"),
    Level("hybrid", "source", "Mamba hybrid (attention layers converted)", _source("hybrid"), arg="hybrid"),
]}

# The default rows: every level that needs no training, one stack, and the trained levels (reported as
# skipped unless their directories are given).
QUICK = ["baseline", "kernels", "w8", "w4-gptq", "smoothquant", "wanda-50", "2:4", "online-50", "lookup",
         "speculative", "wanda-50+w4-gptq+speculative", "student", "hybrid"]
FULL = QUICK + ["w4", "w4-awq", "w8a8", "fp8", "kv-int8", "sparsegpt-50", "w4-gptq+lookup", "wanda-50+w8+lookup",
                "kernels+w4-gptq+lookup", "medusa"]


def level(name: str) -> Level:
    name = name.strip()
    if name in REGISTRY:
        return REGISTRY[name]
    kind, _, recipe = name.partition(":")
    if kind == "quant" and recipe:
        from flashit_jax.quant import resolve

        _, rules = resolve(recipe)
        cal = any(m is not None and m.needs_calibration for _, m in rules)
        return _quant_level(name, recipe, f"quantization recipe {recipe}", calibrated=cal)
    if kind == "prune" and recipe:
        return _prune_level(name, recipe, f"pruning recipe {recipe}", calibrated="magnitude" not in recipe)
    raise FlashitError(f"unknown level {name!r}; known: {', '.join(REGISTRY)}, quant:RECIPE, prune:RECIPE "
                       "(join levels with '+', e.g. w4-gptq+wanda-50+lookup)")


def parse_stack(row: str) -> list[Level]:
    """The levels of a row in stage order; FlashitError on an unknown level or two of one kind."""
    parts = [p for p in row.split("+") if p.strip()]
    if not parts:
        raise FlashitError(f"empty level {row!r}")
    levels = [level(p) for p in parts]
    if len(levels) > 1:
        levels = [lv for lv in levels if lv.name != "baseline"]
    levels.sort(key=lambda lv: STAGES.index(lv.stage))
    for stage in ("source", "prune", "quant", "decode"):
        same = [lv.name for lv in levels if lv.stage == stage]
        if len(same) > 1:
            raise FlashitError(f"row {row!r} stacks {' and '.join(same)}: at most one {stage} level per row")
    names = [lv.name for lv in levels]
    if len(set(names)) != len(names):
        raise FlashitError(f"row {row!r} names a level twice")
    return levels


def canonical(row: str) -> str:
    return "+".join(lv.name for lv in parse_stack(row))


HOW_TO_TRAIN = {  # the levels that need a trained artifact, and how to make one
    "student": "train one: python -m train.distill --teacher smollm2-135m --student layers=0,6,12,18,24,29 "
               "--data bundled --steps 300 --out out/kd, then --student out/kd/model; docs/training.md",
    "hybrid": "convert and distill one: bash train/run_hybrid.sh out/hybrid, then --hybrid out/hybrid/h50/kl/model; "
              "docs/hybrid.md",
    "medusa": "train heads: python -m train.medusa --model smollm2-135m --heads 3 --out runs/medusa; docs/decoding.md",
}


def unavailable(levels: list[Level], env) -> tuple[str, str] | None:
    """(status, why) when this stack cannot run here: "skipped" (by design: no trained artifact
    given, or a level for another device) or "unavailable" (its code is missing); None: it can."""
    for lv in levels:
        if lv.arg and not getattr(env, lv.arg, None):
            return "skipped", f"{lv.name}: no trained {lv.arg} given; pass --{lv.arg} DIR ({HOW_TO_TRAIN[lv.arg]})"
        for mod in lv.needs:
            why = _check_module(mod)
            if why:
                return "unavailable", f"{lv.name} {why}"
        if not lv.on_cpu and env.platform == "cpu":
            return "skipped", (f"{lv.name}: not measured on CPU (the Pallas kernels target GPU/TPU; interpret mode "
                               "would time the interpreter): run the accelerator mode on a GPU/TPU")
    return None


def quality_stack(levels: list[Level]) -> list[Level]:
    """The levels that change the model's outputs: decoding strategies here keep greedy output
    (lookup, speculative) or the target's scores (Medusa), so quality is that of the rest."""
    kept = [lv for lv in levels if lv.stage != "decode"]
    return kept or [REGISTRY["baseline"]]


def build(levels: list[Level], base: Built, env, *, speed_twins: bool = False) -> Built:
    """Apply the stack's adapters to `base`. speed_twins: use each calibrated level's
    calibration-free twin (same shapes and formats) - for speed on random weights."""
    b = base
    for lv in levels:
        if speed_twins and lv.calibrated and lv.speed_twin:
            twin = REGISTRY[lv.speed_twin]
            b = twin.apply(b, env, twin)
            b.notes.append(f"speed of {lv.name} measured in the format of {twin.name} ({twin.what}) on random weights")
        else:
            b = lv.apply(b, env, lv)
    return b
