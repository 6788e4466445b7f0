"""`prune(params, recipe, calib=None) -> params`: unstructured and N:M pruning, a pure function
on the parameter pytree (like `quantize`).

Each parameter path is matched against the recipe's (regex, method) rules (re.fullmatch, first
match wins; a rule with method None keeps the tensor). Matched matrices become MaskedArray
(unstructured) or NMArray (N:M) leaves, or plain arrays with zeros (`output="dense"`); the
rest of the tree is returned unchanged. A MaskedArray leaf can be pruned again (iterative
pruning): its pruned weights are 0 and stay pruned.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.nn.sparse import ActSparse, MaskedArray, NMArray
from flashit_jax.prune import masks
from flashit_jax.prune.methods import Magnitude, Method, SparseGPT, Wanda
from flashit_jax.prune.recipes import MATRICES, resolve


def _check(path: str, leaf, method: Method, recipe_name: str) -> None:
    if isinstance(leaf, (NMArray, ActSparse)) or type(leaf).__name__ == "QArray":
        raise FlashitError(f"{path} is already a {type(leaf).__name__}; prune the float (or MaskedArray) weights")
    if getattr(leaf, "ndim", 0) != 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise FlashitError(f"recipe {recipe_name}: rule {method.describe()} matches {path}, a tensor of shape "
                           f"{tuple(getattr(leaf, 'shape', ()))}; only float matrices [in, out] are pruned")
    if path.endswith("embed/w"):
        raise FlashitError(f"recipe {recipe_name}: {path} is an embedding table; prune linear weights [in, out]")
    if method.nm is not None and leaf.shape[0] % method.nm[1]:
        raise FlashitError(f"recipe {recipe_name}: {method.pattern} groups {method.nm[1]} inputs; {path} "
                           f"{tuple(leaf.shape)} has {leaf.shape[0]} inputs, not a multiple")


def _dense(leaf):
    return leaf.dense() if isinstance(leaf, MaskedArray) else leaf


def _hdiag(calib, path: str) -> np.ndarray:
    return np.asarray(jnp.diag(calib.get(path).h), np.float32)


def score_of(method: Method, path: str, w: np.ndarray, calib) -> np.ndarray:
    """The saliency a one-shot method compares (higher = keep)."""
    if isinstance(method, Magnitude):
        return np.abs(w)
    if isinstance(method, Wanda):
        # |W_ij| * ||X_i||_2: the input norm over calibration tokens, sqrt(H_ii)
        return np.abs(w) * np.sqrt(np.maximum(_hdiag(calib, path), 0.0))[:, None]
    raise AssertionError(method)


def keep_mask(method: Method, score: np.ndarray) -> np.ndarray:
    if method.nm is not None:
        return masks.n_of_m(score, *method.nm)
    if isinstance(method, Wanda):  # Wanda compares within each output
        return masks.lowest_per_column(score, method.sparsity)
    return masks.lowest(score, masks.group_count(method.sparsity, score.size))


def make_leaf(w, keep, method: Method, dtype):
    keep_j = jnp.asarray(keep)
    w = jnp.where(keep_j, jnp.asarray(w, jnp.float32), 0.0).astype(dtype)
    out = method.output
    if out == "dense":
        return w
    if method.nm is not None and out == "auto":
        return NMArray.from_dense(w, keep_j, *method.nm)
    return MaskedArray(w, keep_j)


def prune(params, recipe, calib=None, *, progress: bool = False, log: list | None = None):
    """Pruned copy of `params` (see module doc). `recipe`: a name (`flashit_jax.prune.recipes`) or
    a list of (regex, Method | None) rules. `calib`: `flashit_jax.quant.calibrate(...)`, for
    Wanda and SparseGPT. `log` collects per-matrix details (sparsity, SparseGPT's OBS loss)."""
    from tqdm.auto import tqdm

    name, rules = resolve(recipe)
    flat = tree.flatten(params)
    assign: dict[str, Method] = {}
    for path, leaf in flat.items():
        method = tree.first_match(path, rules)
        if method is None:
            continue
        _check(path, leaf, method, name)
        assign[path] = method
    if not assign:
        raise FlashitError(f"recipe {name} matches no parameter (paths look like {next(iter(flat), '')!r}; "
                           f"the named recipes match {MATRICES})")
    needy = sorted({m.name for m in assign.values() if m.needs_calibration})
    if needy and calib is None:
        raise FlashitError(f"recipe {name} uses {', '.join(needy)}, which need calibration data: pass "
                           "calib=flashit_jax.quant.calibrate(model, params, tokens) (CLI: --calib DATA)")
    log = [] if log is None else log
    out = dict(flat)
    # global magnitude: one comparison over every matrix a rule matches
    groups: dict[Method, list[str]] = {}
    for path, m in assign.items():
        if isinstance(m, Magnitude) and m.scope == "global":
            groups.setdefault(m, []).append(path)
    for m, paths in groups.items():
        keeps = masks.lowest_global({p: np.abs(np.asarray(_dense(flat[p]), np.float32)) for p in paths}, m.sparsity)
        for p in paths:
            out[p] = make_leaf(_dense(flat[p]), keeps[p], m, flat[p].dtype)
            log.append({"path": p, "method": m.name, "scope": "global", "sparsity": 1.0 - float(keeps[p].mean())})
    rest = [p for p in assign if not (isinstance(assign[p], Magnitude) and assign[p].scope == "global")]
    for path in tqdm(rest, desc=f"prune {name}", unit="tensor", disable=not progress):
        m, leaf = assign[path], flat[path]
        w = _dense(leaf)
        rec = {"path": path, "method": m.name, "pattern": m.pattern}
        if isinstance(m, SparseGPT):
            from flashit_jax.prune.sparsegpt import sparsegpt_prune

            if isinstance(leaf, MaskedArray):  # its updates would move weights already pruned
                raise FlashitError(f"{path} is already pruned; SparseGPT prunes dense weights (densify first)")
            wn, keep, loss = sparsegpt_prune(w, calib.get(path).h, m)
            rec["obs_loss"] = loss
        else:
            wn = w
            keep = keep_mask(m, score_of(m, path, np.asarray(w, np.float32), calib))
        out[path] = make_leaf(wn, keep, m, leaf.dtype)
        rec["sparsity"] = 1.0 - float(np.mean(keep))
        log.append(rec)
    return tree.unflatten(out)


# ----------------------------------------------------------------------------- sparse <-> dense
def is_sparse(leaf) -> bool:
    return isinstance(leaf, (MaskedArray, NMArray))


def densify(params):
    """Plain arrays everywhere (pruned weights are 0): what training and quantization take."""
    return tree.map_with_path(lambda p, x: x.dense() if isinstance(x, (MaskedArray, NMArray, ActSparse)) else x,
                              params)


def masks_of(params) -> dict[str, jax.Array]:
    """{path: keep mask} of every sparse leaf."""
    return {p: x.mask for p, x in tree.flatten(params).items() if is_sparse(x)}


def resparsify(params, like):
    """Sparse leaves again, with the types and masks of `like` (after training dense copies)."""
    ref = tree.flatten(like)

    def one(path, x):
        r = ref.get(path)
        if isinstance(r, MaskedArray):
            return MaskedArray.create(x, r.mask)
        if isinstance(r, NMArray):
            return NMArray.from_dense(x, r.mask, r.n, r.m)
        return x

    return tree.map_with_path(one, params)


def sparsity(params, pattern: str = MATRICES) -> dict:
    """{"matrices": kept/total summary over matching matrices, "per_path": {...}}: zeros of plain
    arrays count as pruned; sparse leaves count their mask."""
    import re

    per, kept_all, total_all = {}, 0, 0
    for path, x in tree.flatten(params).items():
        if not re.fullmatch(pattern, path):
            continue
        if is_sparse(x):
            kept = int(jnp.sum(x.mask))
        elif getattr(x, "ndim", 0) == 2:
            kept = int(jnp.sum(jnp.asarray(x) != 0))
        else:
            continue
        total = int(np.prod(x.shape))
        per[path] = 1.0 - kept / total
        kept_all += kept
        total_all += total
    return {"sparsity": 1.0 - kept_all / max(total_all, 1), "n_matrices": len(per), "n_weights": total_all,
            "per_path": per}
