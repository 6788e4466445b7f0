"""Named pruning recipes.

Unstructured / N:M (every linear of every layer: `layers/\\d+/(attn|mlp)/[^/]+/w`):

    magnitude-50          |w|, 50% of each matrix
    global-magnitude-50   |w|, 50% of all matched matrices together (per-matrix sparsity varies)
    wanda-50              |w| * ||x||, 50% of each output column's inputs
    sparsegpt-50          OBS reconstruction, 50% (SparseGPT)
    magnitude-2:4, wanda-2:4, sparsegpt-2:4, ...-4:8   N:M (n kept of every m inputs)

Any number may be fractional (`wanda-37.5`). Structured (a smaller model; `+` joins them,
applied left to right):

    ffn-25       25% of the FFN channels model-wide (per-layer counts differ)
    heads-25     25% of the attention heads model-wide, removing an equal number of query
                 heads from every KV group of a layer
    kv-25        25% of the heads, removing whole KV groups (shrinks the KV cache too)
    depth-4      the 4 layers whose output is most similar to their input
"""
from __future__ import annotations

import re

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.prune.methods import Magnitude, Method, SparseGPT, Wanda, check_sparsity, method_from_dict

MATRICES = r"layers/\d+/(attn|mlp)/[^/]+/w"

_NUM = r"\d+(?:\.\d+)?"
_UNSTRUCTURED = re.compile(rf"(?P<algo>magnitude|global-magnitude|wanda|sparsegpt)-(?:(?P<pct>{_NUM})|(?P<n>\d+):(?P<m>\d+))")
_STRUCTURED = re.compile(rf"(?P<what>ffn|heads|kv|depth)-(?P<amount>{_NUM})")

EXAMPLES = ["magnitude-50", "global-magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2:4", "wanda-2:4",
            "sparsegpt-2:4", "wanda-4:8", "ffn-25", "heads-25", "kv-25", "depth-4", "ffn-25+heads-25"]


def _method(m: re.Match) -> Method:
    algo = m["algo"]
    kw = {"nm": (int(m["n"]), int(m["m"]))} if m["n"] else {"sparsity": float(m["pct"]) / 100.0}
    if algo == "magnitude":
        return Magnitude(**kw)
    if algo == "global-magnitude":
        return Magnitude(scope="global", **kw)
    return Wanda(**kw) if algo == "wanda" else SparseGPT(**kw)


def is_structured(recipe) -> bool:
    return isinstance(recipe, str) and all(_STRUCTURED.fullmatch(p.strip()) for p in recipe.split("+"))


def structured_parts(recipe: str) -> list[tuple[str, float]]:
    """[("ffn", 0.25), ("heads", 0.25), ("depth", 4), ...] of a structured recipe name."""
    parts = []
    for p in recipe.split("+"):
        m = _STRUCTURED.fullmatch(p.strip())
        if m is None:
            raise FlashitError(f"{p!r} is not a structured recipe part (e.g. ffn-25, heads-25, kv-25, depth-4); "
                               "unstructured recipes cannot be joined with '+'")
        what, amount = m["what"], float(m["amount"])
        if what == "depth":
            if amount != int(amount):
                raise FlashitError(f"{p}: depth-N removes N whole layers; N must be an integer")
            parts.append((what, int(amount)))
        else:
            parts.append((what, check_sparsity(amount / 100.0)))
    return parts


def named_recipe(name: str) -> list[tuple[str, Method]]:
    m = _UNSTRUCTURED.fullmatch(name.strip())
    if m is None:
        if is_structured(name):
            raise FlashitError(f"{name} is a structured recipe: it changes the model's shapes, so use "
                               "prune_model(model, params, recipe, ...) (or python -m eval.prune)")
        raise FlashitError(f"unknown pruning recipe {name!r}; examples: {', '.join(EXAMPLES)}")
    return [(MATRICES, _method(m))]


def resolve(recipe) -> tuple[str, list[tuple[str, Method | None]]]:
    """(name, rules) for a recipe name or a list of (regex, Method | dict | None) rules."""
    return tree.resolve_rules(recipe, named_recipe, Method, method_from_dict, "pruning method")


rules_to_json = tree.rules_to_json
