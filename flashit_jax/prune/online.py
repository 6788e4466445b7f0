"""Online (dynamic) pruning: per-token activation sparsity, TEAL/CATS-style.

Every matched linear drops, for each token, the inputs whose magnitude is at most a threshold
calibrated for that linear: t_l = the `fraction_l` quantile of |x| over calibration tokens. The
weights are untouched; the leaf becomes `ActSparse(w, t_l)`, whose decode kernel reads only the
rows of w ([in, out]) of the surviving inputs, so a fraction p of dropped inputs removes about a
fraction p of the weight bytes of that matmul.

    stats = activation_stats(model, params, tokens)              # |x| samples per linear input
    fr = uniform_fractions(stats, 0.4)                           # or any {path: fraction}
    sparse = online_prune(params, thresholds(stats, fr))         # ActSparse leaves

Fractions are stored per linear path (`layers/i/mlp/down/w`), so they transfer to another model
of the same family by relative depth (`map_fractions`).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax import tree
from flashit_jax.errors import FlashitError
from flashit_jax.nn.sparse import ActSparse
from flashit_jax.prune.methods import check_sparsity
from flashit_jax.prune.recipes import MATRICES


def activation_stats(model, params, tokens, *, pattern: str = MATRICES, batch_size: int = 4,
                     max_samples: int = 1 << 18, seed: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
    """{weight path: sorted sample of |x| over the calibration tokens} for every linear matching
    `pattern` (linears sharing an input share a sample)."""
    from tqdm.auto import tqdm

    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise FlashitError(f"calibration tokens must be a non-empty [sequences, length] array, got {tokens.shape}")
    names = [p for p in tree.flatten(params) if re.fullmatch(pattern, p)]
    if not names:
        raise FlashitError(f"no parameter matches {pattern!r} for online pruning")
    n_batches = -(-len(tokens) // batch_size)
    per_batch = max(1, max_samples // n_batches)
    aliases: dict[str, str] = {}

    @jax.jit
    def step(params, toks, key):
        _, _, aux = model.forward(params, toks, collect=("inputs",))
        out = {}
        firsts: dict[int, str] = {}
        for name, x in aux["inputs"].items():
            owner = firsts.setdefault(id(x), name)
            aliases[name] = owner
            if owner != name:
                continue
            a = jnp.abs(x.reshape(-1).astype(jnp.float32))
            idx = jax.random.randint(jax.random.fold_in(key, len(out)), (min(per_batch, a.size),), 0, a.size)
            out[name] = a[idx]
        return out

    samples: dict[str, list] = {}
    key = jax.random.key(seed)
    for b in tqdm(range(n_batches), desc="activation stats", unit="batch", disable=not progress):
        got = step(params, jnp.asarray(tokens[b * batch_size:(b + 1) * batch_size]), jax.random.fold_in(key, b))
        for k, v in got.items():
            samples.setdefault(k, []).append(np.asarray(v))
    owned = {k: np.sort(np.concatenate(v)) for k, v in samples.items()}
    out = {}
    for p in names:
        key_in = p[:-2] if p.endswith("/w") else p
        if key_in not in aliases:
            raise FlashitError(f"{p}: the forward pass reports no input for it (is it a linear weight?)")
        out[p] = owned[aliases[key_in]]
    return out


def uniform_fractions(stats: dict, fraction: float) -> dict[str, float]:
    fraction = check_sparsity(fraction)
    return {p: fraction for p in stats}


def thresholds(stats: dict[str, np.ndarray], fractions: dict[str, float]) -> dict[str, float]:
    """t such that a fraction of the sampled |x| are <= t (0 fraction: t = -1, nothing dropped)."""
    out = {}
    for p, f in fractions.items():
        f = check_sparsity(f)
        if p not in stats:
            raise FlashitError(f"no activation statistics for {p}")
        s = stats[p]
        out[p] = -1.0 if f == 0 else float(s[min(len(s) - 1, int(np.ceil(f * len(s))) - 1)])
    return out


def online_prune(params, thresholds_: dict[str, float]):
    """ActSparse leaves at the given paths (their weights unchanged)."""
    flat = dict(tree.flatten(params))
    for p, t in thresholds_.items():
        if p not in flat:
            raise FlashitError(f"online pruning: no parameter {p}")
        w = flat[p]
        if getattr(w, "ndim", 0) != 2 or type(w).__module__.startswith("flashit_jax.nn"):
            raise FlashitError(f"online pruning wraps dense [in, out] matrices; {p} is {type(w).__name__}")
        flat[p] = ActSparse(w, jnp.asarray(t, jnp.float32))
    return tree.unflatten(flat)


def measured_fractions(model, params, tokens, *, batch_size: int = 4) -> dict[str, float]:
    """The fraction of inputs each ActSparse linear actually drops on `tokens` (held-out check)."""
    flat = tree.flatten(params)
    sparse = {p: x for p, x in flat.items() if isinstance(x, ActSparse)}

    @jax.jit
    def step(params, toks):
        _, _, aux = model.forward(params, toks, collect=("inputs",))
        return {p: jnp.mean((jnp.abs(aux["inputs"][p[:-2]].astype(jnp.float32)) <= x.threshold).astype(jnp.float32))
                for p, x in sparse.items()}

    tokens = np.asarray(tokens, np.int32)
    acc, n = {}, 0
    for i in range(0, len(tokens), batch_size):
        got = step(params, jnp.asarray(tokens[i: i + batch_size]))
        for k, v in got.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        n += 1
    return {k: v / n for k, v in acc.items()}


def map_fractions(fractions: dict[str, float], n_layers_to: int) -> dict[str, float]:
    """Per-layer fractions of one model mapped onto a model with `n_layers_to` layers, by relative
    depth (target layer j takes source layer round(j * (L_src - 1) / (L_to - 1)))."""
    by_layer: dict[int, dict[str, float]] = {}
    for p, f in fractions.items():
        m = re.fullmatch(r"layers/(\d+)/(.*)", p)
        if m is None:
            raise FlashitError(f"fraction path {p!r} is not a layer's linear (layers/i/...)")
        by_layer.setdefault(int(m[1]), {})[m[2]] = f
    src = sorted(by_layer)
    if not src:
        return {}
    n_src = max(src) + 1
    out = {}
    for j in range(n_layers_to):
        i = round(j * (n_src - 1) / max(n_layers_to - 1, 1))
        i = min(src, key=lambda s: abs(s - i))
        for rest, f in by_layer[i].items():
            out[f"layers/{j}/{rest}"] = f
    return out
