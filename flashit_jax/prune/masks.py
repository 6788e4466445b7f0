"""Score -> mask: exact counts per comparison group (host-side numpy; pruning is offline).

Every function returns `keep` (bool, True = the weight stays). Ties at the cut are broken by
position (argpartition / a stable order), so the number removed is always exactly the count.
"""
from __future__ import annotations

import numpy as np

from flashit_jax.prune.methods import group_count


def lowest(score: np.ndarray, count: int) -> np.ndarray:
    """keep-mask removing exactly `count` lowest entries of the whole array."""
    flat = np.asarray(score, np.float32).reshape(-1)
    keep = np.ones(flat.shape, bool)
    if count > 0:
        keep[np.argpartition(flat, count - 1)[:count]] = False
    return keep.reshape(np.shape(score))


def lowest_per_column(score: np.ndarray, sparsity: float) -> np.ndarray:
    """score [K, N]: each column (one output of an [in, out] weight) loses round(sparsity*K) entries."""
    score = np.asarray(score, np.float32)
    k = score.shape[0]
    count = group_count(sparsity, k)
    keep = np.ones(score.shape, bool)
    if count > 0:
        idx = np.argpartition(score, count - 1, axis=0)[:count]
        np.put_along_axis(keep, idx, False, axis=0)
    return keep


def n_of_m(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """score [K, N]: keep the n highest of every m consecutive rows of each column."""
    score = np.asarray(score, np.float32)
    k, cols = score.shape
    g = score.reshape(k // m, m, cols)
    top = np.argsort(-g, axis=1, kind="stable")[:, :n]
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, top, True, axis=1)
    return keep.reshape(k, cols)


def lowest_global(scores: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """One threshold over every array: exactly round(sparsity * total) entries removed in all."""
    names = list(scores)
    sizes = [int(np.size(scores[n])) for n in names]
    total = sum(sizes)
    count = group_count(sparsity, total)
    if count == 0:
        return {n: np.ones(np.shape(scores[n]), bool) for n in names}
    allv = np.concatenate([np.asarray(scores[n], np.float32).reshape(-1) for n in names])
    t = np.partition(allv, count - 1)[count - 1]
    below = allv < t
    need = count - int(below.sum())  # ties at the threshold, taken in order
    tie = np.flatnonzero(allv == t)[:need]
    pruned = below
    pruned[tie] = True
    del allv
    out, off = {}, 0
    for n, s in zip(names, sizes):
        out[n] = ~pruned[off: off + s].reshape(np.shape(scores[n]))
        off += s
    return out
