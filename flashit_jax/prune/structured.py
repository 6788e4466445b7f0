"""Structured pruning: attention heads, FFN channels and whole layers -> a genuinely smaller model.

A `Structure` lists, for every kept layer, the query heads, KV groups and FFN channels that stay.
`compact(config, params, s)` slices the weights and returns a smaller config (per-layer head
counts and FFN widths in `layer_heads` / `layer_ffn_dims`, fewer `n_layers`); `mask(config,
params, s)` zeroes the same units in the full model (a removed head's rows of `o`, a removed
channel's row of `down`, all of `o` and `down` for a removed layer), which computes the same
function: the tests check that the two agree.

Scores (activation importance, from one calibration pass over the current model):
  FFN channel c     H_cc * ||W_down[c, :]||^2        with H the Gram matrix of down's input:
                                                     the squared output change if c alone goes
  query head h      tr(W_o[h]^T H_o[h, h] W_o[h])    the same for head h's block of o's input
  layer             1 - mean cos(h_in, h_out)         ShortGPT's block influence (low = redundant)
Units are ranked model-wide, so per-layer counts differ; by default each score is divided by
its layer's mean score first (`normalize="layer"`), which lost much less than ranking the raw
output errors on SmolLM2-135M (6 validation chunks of 512, no fine-tuning: ffn-25 ppl 53.1
normalized vs 122.8 raw, heads-25 78.6 vs 187.4; dense 27.9). Heads go in units that keep grouped-
query attention regular: `unit="query"` removes the same number of query heads from every KV
group of a layer (the least important of each group), `unit="kv"` removes whole KV groups
(their query heads, key and value heads: the KV cache shrinks too). At least one unit (one
query head per group, one KV group, one FFN channel) stays in every layer.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.prune.methods import check_sparsity, group_count


def _heads_at(config, i):
    from models.llama import heads_at

    return heads_at(config, i)


@dataclasses.dataclass
class Structure:
    layers: list[int]  # kept layer indices (of the model it was made for)
    q: dict[int, list[int]]  # layer -> kept query heads, grouped by kept KV group, equal count per group
    kv: dict[int, list[int]]  # layer -> kept KV groups
    ffn: dict[int, list[int]]  # layer -> kept FFN channels

    @classmethod
    def full(cls, config, params) -> "Structure":
        n = len(params["layers"])
        q, kv, ffn = {}, {}, {}
        for i in range(n):
            lp = params["layers"][i]
            hd = config.head_dim
            q[i] = list(range(_shape(lp["attn"]["q"]["w"])[1] // hd))
            kv[i] = list(range(_shape(lp["attn"]["k"]["w"])[1] // hd))
            ffn[i] = list(range(_shape(lp["mlp"]["down"]["w"])[0]))
        return cls(list(range(n)), q, kv, ffn)

    def to_json(self) -> dict:
        return {"layers": self.layers, "q_heads": {str(i): self.q[i] for i in self.layers},
                "kv_heads": {str(i): self.kv[i] for i in self.layers}, "ffn": {str(i): len(self.ffn[i]) for i in self.layers}}


def _shape(w):
    return tuple(w.shape)


def _check_layer_attn(config, params, s: Structure, i: int):
    hd = config.head_dim
    nq = _shape(params["layers"][i]["attn"]["q"]["w"])[1] // hd
    nkv = _shape(params["layers"][i]["attn"]["k"]["w"])[1] // hd
    g = nq // nkv
    q, kv = s.q[i], s.kv[i]
    if not q or not kv:
        raise FlashitError(f"layer {i}: the structure removes every attention head; keep at least one query head "
                           "per kept KV group (or remove the whole layer)")
    if not s.ffn[i]:
        raise FlashitError(f"layer {i}: the structure removes every FFN channel; keep at least one (or remove the layer)")
    if len(q) % len(kv):
        raise FlashitError(f"layer {i}: {len(q)} query heads cannot be split evenly over {len(kv)} KV groups")
    per = len(q) // len(kv)
    for j, grp in enumerate(kv):
        mine = q[j * per:(j + 1) * per]
        if any(h // g != grp for h in mine):
            raise FlashitError(f"layer {i}: query heads {mine} are not all in KV group {grp} (grouped-query attention "
                               f"maps head h to group h // {g})")


def _cols(heads, hd):
    return np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in heads]).astype(np.int32)


def compact(config, params, s: Structure):
    """(smaller config, sliced params) keeping exactly what `s` lists."""
    if not s.layers:
        raise FlashitError("the structure removes every layer")
    hd = config.head_dim
    layers, heads, ffns = {}, [], []
    for new_i, i in enumerate(s.layers):
        _check_layer_attn(config, params, s, i)
        lp = params["layers"][i]
        qc, kc, ch = _cols(s.q[i], hd), _cols(s.kv[i], hd), np.asarray(s.ffn[i], np.int32)
        a, m = lp["attn"], lp["mlp"]

        def cols(p, idx):
            out = {"w": jnp.asarray(p["w"])[:, idx]}
            if "b" in p:
                out["b"] = jnp.asarray(p["b"])[idx]
            return out

        attn = {"q": cols(a["q"], qc), "k": cols(a["k"], kc), "v": cols(a["v"], kc),
                "o": {**a["o"], "w": jnp.asarray(a["o"]["w"])[qc]}}
        mlp = {"gate": cols(m["gate"], ch), "up": cols(m["up"], ch), "down": {**m["down"], "w": jnp.asarray(m["down"]["w"])[ch]}}
        layers[new_i] = {**lp, "attn": attn, "mlp": mlp}
        heads.append((len(s.q[i]), len(s.kv[i])))
        ffns.append(len(ch))
    widest = max(range(len(heads)), key=lambda j: heads[j])
    uniform_h, uniform_f = len(set(heads)) == 1, len(set(ffns)) == 1
    config = dataclasses.replace(
        config, n_layers=len(s.layers), head_dim=hd, n_heads=heads[widest][0], n_kv_heads=heads[widest][1],
        ffn_dim=max(ffns), layer_heads=None if uniform_h else tuple(heads), layer_ffn_dims=None if uniform_f else tuple(ffns))
    return config, {**params, "layers": layers}


def mask(config, params, s: Structure):
    """The full-size model with the removed units zeroed (same function as `compact`)."""
    hd = config.head_dim
    layers = {}
    for i in range(len(params["layers"])):
        lp = params["layers"][i]
        a, m = lp["attn"], lp["mlp"]
        wo, wd = jnp.asarray(a["o"]["w"]), jnp.asarray(m["down"]["w"])
        if i in s.layers:
            _check_layer_attn(config, params, s, i)
            qmask = np.zeros(wo.shape[0], bool)
            qmask[_cols(s.q[i], hd)] = True
            fmask = np.zeros(wd.shape[0], bool)
            fmask[np.asarray(s.ffn[i], np.int64)] = True
        else:
            qmask, fmask = np.zeros(wo.shape[0], bool), np.zeros(wd.shape[0], bool)
        wo = jnp.where(jnp.asarray(qmask)[:, None], wo, jnp.zeros((), wo.dtype))
        wd = jnp.where(jnp.asarray(fmask)[:, None], wd, jnp.zeros((), wd.dtype))
        layers[i] = {**lp, "attn": {**a, "o": {**a["o"], "w": wo}}, "mlp": {**m, "down": {**m["down"], "w": wd}}}
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- scores
def ffn_scores(params, calib, i: int) -> np.ndarray:
    wd = np.asarray(params["layers"][i]["mlp"]["down"]["w"], np.float32)
    h = np.asarray(jnp.diag(calib.get(f"layers/{i}/mlp/down").h), np.float32)
    return h * np.sum(wd * wd, axis=1)


def head_scores(config, params, calib, i: int) -> np.ndarray:
    hd = config.head_dim
    wo = jnp.asarray(params["layers"][i]["attn"]["o"]["w"], jnp.float32)
    h = jnp.asarray(calib.get(f"layers/{i}/attn/o").h, jnp.float32)
    nh = wo.shape[0] // hd
    hb = h.reshape(nh, hd, nh, hd)[jnp.arange(nh), :, jnp.arange(nh), :]  # [nh, hd, hd] diagonal blocks
    wb = wo.reshape(nh, hd, -1)
    return np.asarray(jnp.einsum("hij,hjd,hid->h", hb, wb, wb, precision=jax.lax.Precision.HIGHEST))


def layer_influence(model, params, tokens, batch_size: int = 4) -> np.ndarray:
    """ShortGPT's block influence of every layer: 1 - mean over tokens of cos(input, output)."""
    from flashit_jax import nn

    c = model.config

    @jax.jit
    def step(params, toks):
        _, _, aux = model.forward(params, toks, collect=("hidden",))
        x0 = nn.embed(toks, params["embed"]["w"]).astype(jnp.float32)
        if getattr(c, "embed_scale", False):
            x0 = x0 * jnp.float32(c.dim ** 0.5)
        hs = [x0] + [h.astype(jnp.float32) for h in aux["hidden"]]
        cos = []
        for a, b in zip(hs[:-1], hs[1:]):
            num = jnp.sum(a * b, -1)
            den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-6
            cos.append(jnp.sum(num / den))
        return jnp.stack(cos)

    tokens = np.asarray(tokens, np.int32)
    total, n = None, 0
    for i in range(0, len(tokens), batch_size):
        b = jnp.asarray(tokens[i: i + batch_size])
        s = step(params, b)
        total = s if total is None else total + s
        n += b.size
    return 1.0 - np.asarray(total) / n


# ----------------------------------------------------------------------------- selection
def _normalize(scores: dict[int, np.ndarray], how: str) -> dict[int, np.ndarray]:
    if how == "none":
        return scores
    if how == "layer":  # importance relative to the layer's own units
        return {i: s / max(float(np.mean(s)), 1e-30) for i, s in scores.items()}
    raise FlashitError(f"unknown score normalization {how!r} (none, layer)")


def select_ffn(structure: Structure, params, calib, fraction: float, *, normalize: str = "layer",
               multiple: int = 1) -> Structure:
    """Remove round(fraction * all channels) channels model-wide, the lowest scores first."""
    fraction = check_sparsity(fraction)
    scores = _normalize({i: ffn_scores(params, calib, i) for i in structure.layers}, normalize)
    total = sum(len(structure.ffn[i]) for i in structure.layers)
    count = group_count(fraction, total)
    cand = []
    for i in structure.layers:
        order = np.argsort(scores[i], kind="stable")
        cand += [(float(scores[i][c]), i, int(c)) for c in order[: len(order) - max(1, multiple)]]
    if count > len(cand):
        raise FlashitError(f"ffn-{100 * fraction:g} removes {count} of {total} FFN channels; at most {len(cand)} can "
                           "go with at least one channel left in every layer")
    cand.sort()
    drop: dict[int, set] = {i: set() for i in structure.layers}
    for _, i, c in cand[:count]:
        drop[i].add(c)
    if multiple > 1:  # round each layer's kept width to a multiple (keep the best of the dropped)
        for i in structure.layers:
            keep_n = len(structure.ffn[i]) - len(drop[i])
            extra = (-keep_n) % multiple
            back = sorted(drop[i], key=lambda c: -scores[i][c])[:extra]
            drop[i] -= set(back)
    ffn = {i: [c for c in structure.ffn[i] if c not in drop[i]] for i in structure.layers}
    return dataclasses.replace(structure, ffn={**structure.ffn, **ffn})


def select_heads(structure: Structure, config, params, calib, fraction: float, *, unit: str = "query",
                 normalize: str = "layer") -> Structure:
    """Remove about fraction * all query heads model-wide in GQA-regular units (see module doc)."""
    fraction = check_sparsity(fraction)
    if unit not in ("query", "kv"):
        raise FlashitError(f"head unit must be 'query' (equal query heads per KV group) or 'kv' (whole groups), "
                           f"got {unit!r}")
    raw = {i: head_scores(config, params, calib, i) for i in structure.layers}
    scores = _normalize(raw, normalize)
    total = sum(len(structure.q[i]) for i in structure.layers)
    count = group_count(fraction, total)
    units = []  # (score per head, layer, rank, heads removed)
    plans = {}
    for i in structure.layers:
        q, kv = structure.q[i], structure.kv[i]
        per = len(q) // len(kv)
        groups = [q[j * per:(j + 1) * per] for j in range(len(kv))]
        sc = scores[i]
        if unit == "query":
            # rank r: the r-th least important head of every group
            ordered = [sorted(g, key=lambda h: (sc[h], h)) for g in groups]
            plans[i] = ordered
            for r in range(per - 1):
                s = sum(float(sc[o[r]]) for o in ordered)
                units.append((s / len(groups), i, r, len(groups)))
        else:
            gsc = [sum(float(sc[h]) for h in g) for g in groups]
            order = sorted(range(len(groups)), key=lambda j: (gsc[j], j))
            plans[i] = (groups, order)
            for r, j in enumerate(order[:-1]):
                units.append((gsc[j] / per, i, r, per))
    units.sort()
    most = sum(u[3] for u in units)
    if count > most:
        raise FlashitError(f"{'heads' if unit == 'query' else 'kv'}-{100 * fraction:g} removes {count} of {total} "
                           f"heads; with at least one {'query head per KV group' if unit == 'query' else 'KV group'} "
                           f"kept in every layer at most {most} can go")
    removed, take = 0, {i: 0 for i in structure.layers}
    for s, i, r, size in units:
        if removed >= count:
            break
        if r != take[i]:  # a layer's units go in rank order
            continue
        if abs(removed + size - count) >= abs(removed - count):
            continue
        take[i] += 1
        removed += size
    q, kv = dict(structure.q), dict(structure.kv)
    for i in structure.layers:
        if not take[i]:
            continue
        if unit == "query":
            ordered = plans[i]
            gone = {h for o in ordered for h in o[: take[i]]}
            q[i] = [h for h in structure.q[i] if h not in gone]
        else:
            groups, order = plans[i]
            gone = set(order[: take[i]])
            kv[i] = [structure.kv[i][j] for j in range(len(groups)) if j not in gone]
            q[i] = [h for j, g in enumerate(groups) if j not in gone for h in g]
    return dataclasses.replace(structure, q=q, kv=kv)


def select_layers(structure: Structure, influence: np.ndarray, n_drop: int) -> Structure:
    n = len(structure.layers)
    if not 0 <= n_drop < n:
        raise FlashitError(f"depth-{n_drop}: the model has {n} layers; remove between 0 and {n - 1}")
    order = sorted(structure.layers, key=lambda i: (float(influence[i]), i))
    gone = set(order[:n_drop])
    return dataclasses.replace(structure, layers=[i for i in structure.layers if i not in gone])


def summarize(config, params) -> dict:
    n_attn = sum(_shape(params["layers"][i]["attn"]["q"]["w"])[1] // config.head_dim for i in range(len(params["layers"])))
    n_kv = sum(_shape(params["layers"][i]["attn"]["k"]["w"])[1] // config.head_dim for i in range(len(params["layers"])))
    n_ffn = sum(_shape(params["layers"][i]["mlp"]["down"]["w"])[0] for i in range(len(params["layers"])))
    n_params = sum(int(math.prod(_shape(x))) for x in jax.tree.leaves(params))
    return {"n_layers": len(params["layers"]), "query_heads": n_attn, "kv_heads": n_kv, "ffn_channels": n_ffn,
            "n_params": n_params}
