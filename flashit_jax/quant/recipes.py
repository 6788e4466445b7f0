"""Named recipes: lists of (regex, method) rules over '/'-joined parameter paths.

    w8                    int8 symmetric, one scale per output channel (RTN)
    w4g64, w3g64          4/3-bit asymmetric groups of 64 along `in` (RTN); any g: w4g128, w4g32
    w4g32-asym            the same with groups of 32: llama.cpp's Q4_1 layout (fp16 scale and min)
    w4g64-sym             symmetric groups
    w4g64-gptq, w3g64-gptq  GPTQ with act-order (static groups); -gptq-noact: in column order
    w4g64-awq, w3g64-awq  AWQ
    w2g64-hadamard-gptq   -hadamard: each matrix's input dimension rotated by a random Hadamard
                          first (QuIP#-style incoherence; x is rotated on the fly), then RTN/GPTQ
    aqlm-2x8              AQLM: 2 codebooks of 2^8 entries over groups of 8 weights (2 bits/weight);
                          aqlm-MxB[gD] in general
    w8a8                  int8 weights (per channel) x int8 activations (per token, dynamic)
    w8a8-smoothquant      the same after SmoothQuant smoothing (alpha 0.5; -smoothquant0.8 for 0.8)
    llm-int8              LLM.int8 (outlier threshold 6)
    fp8                   float8 e4m3 weights, per-channel scales
    bitnet                BitNet b1.58 ternary weights (absmean per tensor) x int8 activations
                          (after QAT: train.finetune --qat-method bitnet); bitnet-pc: scale per column
    ...+emb8              also the embedding / lm_head: int8, one scale per vocab row

Named recipes quantize the attention and MLP matrices of every layer; the embedding and an
untied lm_head only with `+emb8`. Group sizes must divide each matrix's `in` dimension.
"""
from __future__ import annotations

import re

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.quant.methods import AQLM, AWQ, FP8, GPTQ, RTN, BitNet, LLMInt8, Method, SmoothQuant, W8A8, method_from_dict

MATRICES = r"layers/\d+/(attn|mlp)/[^/]+/w"
EMBEDDINGS = [r"embed/w", r"lm_head/w"]
EMB8 = RTN(bits=8, group_size=None, symmetric=True)

_WEIGHT_RE = re.compile(r"w(?P<bits>[2-8])(?:g(?P<group>\d+))?(?P<sym>-sym|-asym)?(?P<had>-hadamard)?(?P<algo>-gptq(?:-noact)?|-awq)?")
_AQLM_RE = re.compile(r"aqlm-(?P<m>\d+)x(?P<b>\d+)(?:g(?P<g>\d+))?")
_SQ_RE = re.compile(r"w8a8-smoothquant(?P<alpha>\d*\.?\d+)?")

EXAMPLES = ["w8", "w4g64", "w4g32-asym", "w4g64-gptq", "w4g64-awq", "w2g64-hadamard-gptq", "w3g64-hadamard", "aqlm-2x8", "w3g64", "w3g64-gptq", "w3g64-awq",
            "w4g128", "w4g128-gptq", "w8a8", "w8a8-smoothquant", "llm-int8", "fp8", "w4g128+emb8", "w8+emb8"]


def _base_method(base: str) -> Method:
    if base == "w8a8":
        return W8A8()
    if base == "llm-int8":
        return LLMInt8()
    if base == "fp8":
        return FP8()
    if base in ("bitnet", "bitnet-pc"):
        return BitNet(per_channel=base == "bitnet-pc")
    m = _AQLM_RE.fullmatch(base)
    if m:
        return AQLM(num_codebooks=int(m["m"]), codebook_bits=int(m["b"]), group_size=int(m["g"] or 8))
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
    had = bool(m["had"])
    if algo.startswith("-gptq"):
        return GPTQ(bits=bits, group_size=group, symmetric=symmetric, act_order=not algo.endswith("-noact"),
                    hadamard=had)
    if algo == "-awq":
        if had:
            raise FlashitError(f"recipe {base!r}: AWQ's scales and a Hadamard rotation are not combined here "
                               "(use -hadamard with RTN or GPTQ)")
        return AWQ(bits=bits, group_size=group, symmetric=symmetric)
    return RTN(bits=bits, group_size=group, symmetric=symmetric, hadamard=had)


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
    return tree.resolve_rules(recipe, named_recipe, Method, method_from_dict, "quantization method")


rules_to_json = tree.rules_to_json
