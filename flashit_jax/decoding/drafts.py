"""Draft models: any model sharing the target's vocabulary (a smaller model of the family, the
distilled student of `train.distill`), or a layer-skipped copy of the target (self-speculation:
the draft runs a subset of the target's layers with the same weights, so it costs no memory
beyond its own KV cache).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flashit_jax.errors import FlashitError


@dataclasses.dataclass
class Draft:
    model: Any  # models.Model
    params: Any
    note: str = ""


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'0-9+25-29' (inclusive ranges and single indices joined by '+') or a Python slice
    '0:30:2' -> sorted layer indices."""
    spec = spec.strip()
    try:
        if ":" in spec:
            parts = [int(x) if x else None for x in spec.split(":")]
            if len(parts) > 3:
                raise ValueError
            keep = list(range(n_layers))[slice(*parts)]
        else:
            keep = []
            for part in spec.split("+"):
                lo, _, hi = part.partition("-")
                keep += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise FlashitError(f"bad layer selection {spec!r}: use ranges like '0-9+25-29' or a slice like '0:30:2'") from None
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad:
        raise FlashitError(f"layer selection {spec!r} names layers {bad} outside 0..{n_layers - 1}")
    keep = sorted(set(keep))
    if not keep:
        raise FlashitError(f"layer selection {spec!r} keeps no layer")
    return keep


def layer_skip_draft(model, params, layers) -> Draft:
    """The target restricted to `layers` (indices, or a `parse_layers` string), sharing its arrays."""
    from models import Model

    n = len(params["layers"])
    keep = parse_layers(layers, n) if isinstance(layers, str) else sorted({int(i) for i in layers})
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise FlashitError(f"layers {layers} outside 0..{n - 1}")
    if not hasattr(model.config, "n_layers"):
        raise FlashitError(f"{type(model.config).__name__} has no layer count to skip layers of")
    config = dataclasses.replace(model.config, n_layers=len(keep))
    sub = {**params, "layers": {i: params["layers"][k] for i, k in enumerate(keep)}}
    return Draft(Model(config), sub, note=f"layers {keep} of the target ({len(keep)}/{n})")


def check_draft(target_model, target_params, draft: Draft) -> None:
    tv = _vocab(target_model, target_params)
    dv = _vocab(draft.model, draft.params)
    if tv != dv:
        raise FlashitError(f"the draft's vocabulary ({dv} tokens) differs from the target's ({tv}); "
                           "speculative decoding needs a draft sharing the target's tokenizer")
    check_rollback(draft.model, "draft")


def check_rollback(model, role: str) -> None:
    from flashit_jax.nn.cache import KVCache

    cache = model.init_cache(1, 1)
    if not isinstance(cache, KVCache):
        raise FlashitError(f"the {role} model ({type(model.config).__name__}) keeps a {type(cache).__name__}, "
                           "which cannot roll back rejected tokens; speculative decoding needs a KV cache")


def _vocab(model, params) -> int:
    from flashit_jax.nn.linear import weight_shape

    return int(weight_shape(params["embed"]["w"])[0])


def search_layers(model, params, tokens, n_keep: int, *, protect=(0,), progress: bool = True) -> list[int]:
    """Layers to keep for a self-speculation draft, chosen greedily (as Draft & Verify's search,
    with a greedy rule instead of Bayesian optimisation): repeatedly drop the layer whose removal
    keeps the draft's top-1 prediction equal to the target's at the most positions of `tokens`
    (int32 [B, T], calibration text). Layers in `protect` are never dropped.
    Returns the kept layer indices (sorted)."""
    drops = layer_drop_order(model, params, tokens, n_keep, protect=protect, progress=progress)
    return [i for i in range(len(params["layers"])) if i not in {d for d, _ in drops}]


def layer_drop_order(model, params, tokens, n_keep: int, *, protect=(0,), progress: bool = True):
    """The greedy search of `search_layers` as [(dropped layer, agreement after dropping it), ...]:
    its first k entries give the draft of n - k layers, for every k up to n - n_keep."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    n = len(params["layers"])
    if not 1 <= n_keep <= n:
        raise FlashitError(f"n_keep must be in 1..{n}, got {n_keep}")
    protect = {p % n for p in protect}

    @jax.jit
    def agree(sub, want):
        logits, _, _ = draft_model(len(sub["layers"])).forward(sub, tokens)
        return jnp.mean((jnp.argmax(logits, -1) == want).astype(jnp.float32))

    def draft_model(k):
        from models import Model

        return Model(dataclasses.replace(model.config, n_layers=k))

    want = jnp.argmax(jax.jit(lambda p: model.forward(p, tokens)[0])(params), -1)
    keep, drops = list(range(n)), []
    bar = tqdm(total=n - n_keep, desc="layer search", disable=not progress)
    while len(keep) > n_keep:
        scores = {}
        for drop in keep:
            if drop in protect:
                continue
            kept = [i for i in keep if i != drop]
            scores[drop] = float(agree({**params, "layers": {j: params["layers"][i] for j, i in enumerate(kept)}},
                                       want))
        best = max(scores, key=scores.get)
        keep.remove(best)
        drops.append((best, scores[best]))
        bar.update(1)
        bar.set_postfix(dropped=best, agreement=f"{scores[best]:.3f}")
    bar.close()
    return drops
