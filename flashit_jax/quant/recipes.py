"""Named recipes: lists of (regex, method) rules over '/'-joined parameter paths.

    w8                    int8 symmetric, one scale per output channel (RTN)
    w4g64, w3g64          4/3-bit asymmetric groups of 64 along `in` (RTN); any g: w4g128, w4g32
    w4g32-asym            the same with groups of 32: llama.cpp's Q4_1 layout (fp16 scale and min)
    w4g64-sym             symmetric groups
    w4g64-gptq, w3g64-gptq  GPTQ with act-order (static groups); -gptq-noact: in column order
    w4g64-awq, w3g64-awq  AWQ
    w8a8                  int8 weights (per channel) x int8 activations (per token, dynamic)
    w8a8-smoothquant      the same after SmoothQuant smoothing (alpha 0.5; -smoothquant0.8 for 0.8)
    llm-int8              LLM.int8 (outlier threshold 6)
    fp8                   float8 e4m3 weights, per-channel scales
    ...+emb8              also the embedding / lm_head: int8, one scale per vocab row

Named recipes quantize the attention and MLP matrices of every layer; the embedding and an
untied lm_head only with `+emb8`. Group sizes must divide each matrix's `in` dimension.
"""
from __future__ import annotations

import re

from flashit_jax.errors import FlashitError
from flashit_jax.quant.methods import AWQ, FP8, GPTQ, RTN, LLMInt8, Method, SmoothQuant, W8A8, method_from_dict

MATRICES = r"layers/\d+/(attn|mlp)/[^/]+/w"
EMBEDDINGS = [r"embed/w", r"lm_head/w"]
EMB8 = RTN(bits=8, group_size=None, symmetric=True)

_WEIGHT_RE = re.compile(r"w(?P<bits>[2-8])(?:g(?P<group>\d+))?(?P<sym>-sym|-asym)?(?P<algo>-gptq(?:-noact)?|-awq)?")
_SQ_RE = re.compile(r"w8a8-smoothquant(?P<alpha>\d*\.?\d+)?")

EXAMPLES = ["w8", "w4g64", "w4g32-asym", "w4g64-gptq", "w4g64-awq", "w3g64", "w3g64-gptq", "w3g64-awq",
            "w4g128", "w4g128-gptq", "w8a8", "w8a8-smoothquant", "llm-int8", "fp8", "w4g128+emb8", "w8+emb8"]


def _base_method(base: str) -> Method:
    if base == "w8a8":
        return W8A8()
    if base == "llm-int8":
        return LLMInt8()
    if base == "fp8":
        return FP8()
    m = _SQ_RE.fullmatch(base)
    if m:
        return SmoothQuant(alpha=float(m["alpha"]) if m["alpha"] else 0.5)
    m = _WEIGHT_RE.fullmatch(base)
    if m is None:
        raise FlashitError(f"unknown recipe {base!r}; examples: {', '.join(EXAMPLES)}")
    bits = int(m["bits"])
    if bits not in (2, 3, 4, 8):
        raise FlashitError(f"recipe {base!r}: {bits}-bit weights are not supported (2, 3, 4, 8)")
    group = int(m["group"]) if m["group"] else None
    symmetric = m["sym"] == "-sym" if m["sym"] else bits == 8
    algo = m["algo"] or ""
    if algo.startswith("-gptq"):
        return GPTQ(bits=bits, group_size=group, symmetric=symmetric, act_order=not algo.endswith("-noact"))
    if algo == "-awq":
        return AWQ(bits=bits, group_size=group, symmetric=symmetric)
    return RTN(bits=bits, group_size=group, symmetric=symmetric)


def named_recipe(name: str) -> list[tuple[str, Method]]:
    """The rules of a recipe name (see the module doc)."""
    base, *suffixes = name.strip().split("+")
    rules: list[tuple[str, Method]] = []
    for s in suffixes:
        if s != "emb8":
            raise FlashitError(f"unknown recipe suffix +{s} in {name!r} (known: +emb8)")
        rules += [(p, EMB8) for p in EMBEDDINGS]
    rules.append((MATRICES, _base_method(base)))
    return rules


def resolve(recipe) -> tuple[str, list[tuple[str, Method | None]]]:
    """(name, rules) for a recipe name or a list of (regex, Method | dict | None) rules."""
    if isinstance(recipe, str):
        return recipe, named_recipe(recipe)
    rules = []
    for item in recipe:
        try:
            pattern, method = item
        except (TypeError, ValueError):
            raise FlashitError(f"recipe rules are (regex, method) pairs; got {item!r}") from None
        if isinstance(method, dict):
            method = method_from_dict(method)
        if method is not None and not isinstance(method, Method):
            raise FlashitError(f"rule {pattern!r}: {method!r} is not a quantization method")
        try:
            re.compile(pattern)
        except re.error as e:
            raise FlashitError(f"rule {pattern!r} is not a valid regex: {e}") from None
        rules.append((pattern, method))
    return "custom", rules


def rules_to_json(rules) -> list:
    return [[p, None if m is None else m.to_dict()] for p, m in rules]
