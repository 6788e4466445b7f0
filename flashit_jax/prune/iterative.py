"""The pure parts of iterative magnitude pruning and the lottery-ticket procedure (the training
around them is `train.imp`).

    keep = imp_masks(trained, keep, sparsity)      # magnitude, the pruned weights of earlier rounds first
    start = rewind(early, keep)                    # lottery ticket: every weight back to θ_k, pruned ones 0
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.prune import masks as mk
from flashit_jax.prune.methods import check_sparsity, group_count
from flashit_jax.prune.recipes import MATRICES


def round_sparsity(rate: float, r: int) -> float:
    """Total sparsity after r rounds that each remove `rate` of the weights still there."""
    rate = check_sparsity(rate)
    return 1.0 - (1.0 - rate) ** r


def imp_masks(params, prev: dict[str, np.ndarray] | None, sparsity: float, *, pattern: str = MATRICES,
              scope: str = "global") -> dict[str, np.ndarray]:
    """{path: keep} removing exactly round(sparsity * n) weights (globally or per matrix) by |w|,
    the weights `prev` already removed going first (they stay removed)."""
    sparsity = check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise FlashitError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = {p: x for p, x in tree.flatten(params).items() if re.fullmatch(pattern, p)}
    if not flat:
        raise FlashitError(f"no parameter matches {pattern!r}")
    scores = {}
    for p, x in flat.items():
        w = np.abs(np.asarray(x.dense() if hasattr(x, "dense") else x, np.float32))
        if prev is not None and p in prev:
            w = np.where(np.asarray(prev[p], bool), w, -1.0)  # earlier pruned: lowest of all
        scores[p] = w
    if prev is not None:
        before = 1.0 - sum(float(np.sum(prev[p])) for p in flat if p in prev) / sum(s.size for s in scores.values())
        if sparsity + 1e-12 < before:
            raise FlashitError(f"round sparsity {sparsity:.4f} is below the {before:.4f} already pruned")
    if scope == "global":
        return mk.lowest_global(scores, sparsity)
    return {p: mk.lowest(s, group_count(sparsity, s.size)) for p, s in scores.items()}


def rewind(early, keep: dict[str, np.ndarray]):
    """θ_k everywhere, 0 where `keep` is False: the lottery-ticket restart point."""
    def one(path, x):
        if path in keep:
            return jnp.where(jnp.asarray(keep[path]), jnp.asarray(x), jnp.zeros((), jnp.asarray(x).dtype))
        return x

    missing = set(keep) - set(tree.flatten(early))
    if missing:
        raise FlashitError(f"the rewind point lacks pruned parameters {sorted(missing)[:4]}")
    return tree.map_with_path(one, early)


def apply_keep(params, keep: dict[str, np.ndarray]):
    """The trained values with the pruned ones zeroed (IMP without rewinding)."""
    return rewind(params, keep)
