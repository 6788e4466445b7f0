"""'/'-joined parameter paths: the names regex rules (quantize, prune, shard) match against."""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    return "/".join(_key_str(k) for k in path)


def is_leaf_weight(x) -> bool:
    """Weight types (QArray, sparse) are pytree nodes but count as one parameter here."""
    from flashit_jax.nn.linear import _OPS

    return type(x) in _OPS


def flatten(params) -> dict[str, Any]:
    """{'layers/0/attn/q/w': array, ...}; a registered weight type stays one entry."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf_weight)[0]
    return {path_str(p): v for p, v in leaves}


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of `flatten`: digit path segments become int keys, as `nnx.to_pure_dict` makes them."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def map_with_path(fn: Callable[[str, Any], Any], params):
    """fn(path, leaf) over every parameter (weight types count as leaves)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), params, is_leaf=is_leaf_weight)


def first_match(path: str, rules: Iterable[tuple[str, Any]], default=None):
    """The value of the first (regex, value) rule that `re.fullmatch`es path."""
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    return default


def resolve_rules(recipe, named: Callable[[str], list], method_type: type, from_dict: Callable[[dict], Any],
                  kind: str) -> tuple[str, list[tuple[str, Any]]]:
    """(name, rules) for a recipe name (looked up by `named`) or a list of (regex, method | dict |
    None) rules, each method a `method_type` (dicts go through `from_dict`); `kind` names the
    method family in errors ("quantization method", "pruning method")."""
    from flashit_jax.errors import FlashitError

    if isinstance(recipe, str):
        return recipe, named(recipe)
    rules = []
    for item in recipe:
        try:
            pattern, method = item
        except (TypeError, ValueError):
            raise FlashitError(f"recipe rules are (regex, method) pairs; got {item!r}") from None
        if isinstance(method, dict):
            method = from_dict(method)
        if method is not None and not isinstance(method, method_type):
            raise FlashitError(f"rule {pattern!r}: {method!r} is not a {kind}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise FlashitError(f"rule {pattern!r} is not a valid regex: {e}") from None
        rules.append((pattern, method))
    return "custom", rules


def rules_to_json(rules) -> list:
    """(regex, method | None) rules as json: [[regex, method.to_dict() | None], ...]."""
    return [[p, None if m is None else m.to_dict()] for p, m in rules]
