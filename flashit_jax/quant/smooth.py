"""Per-channel scales folded into the preceding layer: AWQ and SmoothQuant.

A linear's input x may be divided by a per-channel s if the layer that produced x is divided
too and the linear's rows are multiplied by s: (x / s) (diag(s) W) = x W. The producer is an
RMSNorm (its scale absorbs 1/s: x_norm * (o + w) / s = x_norm * (o + w') with w' = (o + w)/s - o)
or a linear (its output columns are divided by s). Where consumers share a producer (q/k/v read
attn_norm; gate/up read mlp_norm) they share s. For o, the producer is v: with grouped-query
attention several query heads read one KV head, so s lives on v's channels and is repeated
over the heads of each group. `up` produces down's input (silu(gate) * up is linear in up).

AWQ picks s = mean|x|^alpha (alpha on a grid, the one with the lowest output error
tr(E^T H E) of the quantized layer), SmoothQuant s = max|x|^a / max|w|^(1-a).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError
from flashit_jax.quant.calib import Calibration
from flashit_jax.quant.rtn import quantize_groups, values_for


@dataclasses.dataclass(frozen=True)
class SmoothGroup:
    producer: str  # "layers/0/attn_norm/scale" (norm) or "layers/0/attn/v" (linear: .../w and .../b)
    kind: str  # "norm" | "linear"
    consumers: tuple[str, ...]  # ".../w" paths
    head_dim: int = 0  # > 0: consumer channel h*head_dim + d reads producer channel (h // rep)*head_dim + d


def llama_groups(flat: dict, n_layers: int, head_dim: int) -> list[SmoothGroup]:
    """Producer -> consumer groups of the Llama family, consumers' final weights first (v before
    q/k/v, up before gate/up), so that a search sees the weights as they will be quantized."""
    out = []
    for i in range(n_layers):
        p = f"layers/{i}/"
        cand = [
            SmoothGroup(p + "attn/v", "linear", (p + "attn/o/w",), head_dim),
            SmoothGroup(p + "attn_norm/scale", "norm", (p + "attn/q/w", p + "attn/k/w", p + "attn/v/w")),
            SmoothGroup(p + "mlp/up", "linear", (p + "mlp/down/w",)),
            SmoothGroup(p + "mlp_norm/scale", "norm", (p + "mlp/gate/w", p + "mlp/up/w")),
        ]
        for g in cand:
            prod = g.producer + ("/w" if g.kind == "linear" else "")
            if prod in flat and all(c in flat for c in g.consumers):
                out.append(g)
    return out


def channel_map(group: SmoothGroup, flat: dict) -> np.ndarray:
    """int [Kc]: the producer channel of each consumer input channel."""
    kc = flat[group.consumers[0]].shape[0]
    if not group.head_dim:
        return np.arange(kc)
    kp = flat[group.producer + "/w"].shape[1]
    hd = group.head_dim
    rep = (kc // hd) // (kp // hd)
    c = np.arange(kc)
    return (c // hd // rep) * hd + c % hd


def _reduce_to_producer(v, cmap: np.ndarray, kp: int, how: str):
    v = jnp.asarray(v, jnp.float32)
    if len(cmap) == kp:
        return v
    seg = jnp.asarray(cmap)
    if how == "max":
        return jax.ops.segment_max(v, seg, num_segments=kp)
    return jax.ops.segment_sum(v, seg, num_segments=kp) / (len(cmap) // kp)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype", "grid"))
def _awq_losses(w, h, xmean_p, cmap, *, bits, group_size, symmetric, scale_dtype, grid):
    def loss_at(alpha):
        s = jnp.maximum(xmean_p ** alpha, 1e-4)
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        sc = s[cmap][:, None]
        c, qs, qz = quantize_groups(w * sc, bits=bits, group_size=group_size, symmetric=symmetric,
                                    scale_dtype=scale_dtype)
        k, n = w.shape
        g = k // group_size
        deq = values_for(c.reshape(g, group_size, n), qs[:, None, :], None if qz is None else qz[:, None, :])
        e = deq.reshape(k, n) / sc - w
        return jnp.sum(e * (h @ e)), s

    return jax.lax.map(loss_at, jnp.arange(grid, dtype=jnp.float32) / grid)


def awq_scales(ws: list, stats, cmap: np.ndarray, kp: int, method) -> tuple[np.ndarray, dict]:
    """AWQ's s over producer channels [kp] for consumers `ws` ([Kc, N_i] each, concatenated)."""
    w = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in ws], axis=1)
    group = method.group_size or w.shape[0]
    xmean_p = _reduce_to_producer(stats.absmean, cmap, kp, "mean")
    losses, scales = _awq_losses(w, stats.h, xmean_p, jnp.asarray(cmap), bits=method.bits, group_size=group,
                                 symmetric=method.symmetric, scale_dtype=jnp.dtype(method.scale_dtype),
                                 grid=method.grid)
    best = int(jnp.argmin(losses))
    return np.asarray(scales[best]), {"alpha": best / method.grid, "loss": float(losses[best]),
                                      "loss_rtn": float(losses[0])}


def smoothquant_scales(ws: list, stats, cmap: np.ndarray, kp: int, alpha: float) -> np.ndarray:
    wmax = jnp.max(jnp.concatenate([jnp.abs(jnp.asarray(x, jnp.float32)) for x in ws], axis=1), axis=1)
    xmax_p = _reduce_to_producer(stats.absmax, cmap, kp, "max")
    wmax_p = _reduce_to_producer(wmax, cmap, kp, "max")
    s = xmax_p ** alpha / jnp.maximum(wmax_p, 1e-5) ** (1 - alpha)
    s = jnp.where((xmax_p > 0) & (wmax_p > 0), jnp.maximum(s, 1e-5), 1.0)
    return np.asarray(s)


def fold(flat: dict, group: SmoothGroup, s_p: np.ndarray, cmap: np.ndarray, norm_offset: float) -> None:
    """Divide the producer by s (per producer channel), multiply the consumers' rows (in place on `flat`)."""
    s_p = jnp.asarray(s_p, jnp.float32)
    s_c = s_p[jnp.asarray(cmap)]
    if group.kind == "norm":
        old = flat[group.producer]
        flat[group.producer] = ((old.astype(jnp.float32) + norm_offset) / s_p - norm_offset).astype(old.dtype)
    else:
        for suffix, fn in (("/w", lambda a: a / s_p[None, :]), ("/b", lambda a: a / s_p)):
            key = group.producer + suffix
            if key in flat:
                old = flat[key]
                if not isinstance(old, (jax.Array, np.ndarray)):
                    raise FlashitError(f"cannot fold smoothing scales into {key}: it is already quantized")
                flat[key] = fn(old.astype(jnp.float32)).astype(old.dtype)
    for c in group.consumers:
        old = flat[c]
        flat[c] = (old.astype(jnp.float32) * s_c[:, None]).astype(old.dtype)


def apply_smoothing(flat: dict, assign: dict, calib: Calibration, *, n_layers: int, head_dim: int,
                    norm_offset: float, log: list) -> Calibration:
    """Fold AWQ / SmoothQuant scales for every group whose consumers use such a method.

    Mutates `flat` (producers and consumers); returns the calibration with the consumers'
    statistics rescaled (the caller's object is left as it was).
    """
    stats = dict(calib.stats)
    for group in llama_groups(flat, n_layers, head_dim):
        methods = {assign.get(c) for c in group.consumers}
        smoothing = {m for m in methods if m is not None and m.smoothing}
        if not smoothing:
            continue
        if len(methods) != 1:
            raise FlashitError(f"{', '.join(group.consumers)} read the same input ({group.producer}) and so must "
                               f"share one smoothing method; the recipe gives {sorted(map(str, methods))}")
        method = smoothing.pop()
        cmap = channel_map(group, flat)
        kp = int(cmap.max()) + 1
        key = group.consumers[0][:-2]
        if key not in stats:
            raise FlashitError(f"no calibration statistics for {key!r}")
        st = stats[key]
        ws = [flat[c] for c in group.consumers]
        if method.name == "awq":
            s_p, info = awq_scales(ws, st, cmap, kp, method)
        else:
            s_p, info = smoothquant_scales(ws, st, cmap, kp, method.alpha), {"alpha": method.alpha}
        fold(flat, group, s_p, cmap, norm_offset)
        new = st.scaled(np.asarray(s_p)[cmap])
        for c in group.consumers:
            stats[c[:-2]] = new
        log.append({"group": group.producer, "method": method.name, **info})
    return dataclasses.replace(calib, stats=stats)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype", "n_grid"))
def awq_clip(w, h, *, bits, group_size, symmetric, scale_dtype, n_grid: int = 10, max_shrink: float = 0.5):
    """Per (group, column) clipping ratio in [1 - max_shrink, 1] minimizing e^T H_gg e of the group
    (AWQ's clip search, on the group's diagonal block of H). Returns ratios [G, N]."""
    k, n = w.shape
    g = k // group_size
    idx = jnp.arange(g)
    hb = h.reshape(g, group_size, g, group_size)[idx, :, idx, :]  # [G, gs, gs]

    def loss_at(r):
        clip = jnp.full((g, n), r, jnp.float32)
        c, qs, qz = quantize_groups(w, clip, bits=bits, group_size=group_size, symmetric=symmetric,
                                    scale_dtype=scale_dtype)
        deq = values_for(c.reshape(g, group_size, n), qs[:, None, :], None if qz is None else qz[:, None, :])
        e = deq - w.reshape(g, group_size, n)
        return jnp.einsum("gin,gij,gjn->gn", e, hb, e)

    ratios = 1.0 - jnp.arange(n_grid, dtype=jnp.float32) / n_grid * max_shrink
    losses = jax.lax.map(loss_at, ratios)  # [R, G, N]
    return ratios[jnp.argmin(losses, axis=0)]
