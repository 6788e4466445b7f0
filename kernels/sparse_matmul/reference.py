"""Sparse matmuls in pure jnp: the definitions the Pallas kernels are tested against.

N:M packed weights. A weight W [K, N] (K = the contracted `in` axis) is N:M sparse when every
group of m consecutive rows of each column holds at most n non-zeros (2:4, 4:8). Stored:

    values [n, K/m, N]   plane p holds the p-th kept value of every group (in row order)
    meta   [K/m, N]      the n in-group positions of a group, `bits` = ceil(log2 m) bits each,
                         plane p at bits [p*bits, (p+1)*bits); uint8 (2:4), uint16 (4:8), uint32

so that W[g*m + pos_p(g, c), c] = values[p, g, c]. Plane-major values let a kernel read each
plane as a dense [groups, columns] tile; a group's positions share one word of metadata.

Activation-sparse (online pruning, TEAL-style): inputs with |x| <= threshold are dropped, so
only the rows of W [K, N] at the surviving inputs are needed: y = sum_{k: |x_k| > t} x_k W[k, :].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def nm_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def meta_dtype(n: int, m: int):
    need = n * nm_bits(m)
    for dt in (jnp.uint8, jnp.uint16, jnp.uint32):
        if need <= jnp.iinfo(dt).bits:
            return dt
    raise ValueError(f"{n}:{m} metadata needs {need} bits per group; at most 32 are supported")


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise ValueError(f"N:M needs integers, got {n!r}:{m!r}")
    if not 1 <= n <= m:
        raise ValueError(f"N:M sparsity needs 1 <= N <= M, got {n}:{m}")
    meta_dtype(n, m)


def nm_compress(w, keep, n: int, m: int):
    """(values [n, K/m, N], meta [K/m, N]) of w [K, N] restricted to `keep` (bool [K, N] with at
    most n True per group of m rows of a column). Groups with fewer than n kept values pad with
    zeros at unused positions (a value of 0 contributes nothing)."""
    check_nm(n, m)
    k, cols = w.shape
    if k % m:
        raise ValueError(f"{m} does not divide the {k} rows of the weight")
    g = k // m
    keep = jnp.asarray(keep, bool).reshape(g, m, cols)
    wg = jnp.asarray(w).reshape(g, m, cols)
    # kept positions first (stable, so in row order), then the dropped ones
    order = jnp.argsort(~keep, axis=1, stable=True)[:, :n]  # [g, n, cols]
    vals = jnp.take_along_axis(wg, order, axis=1)
    kept = jnp.take_along_axis(keep, order, axis=1)
    vals = jnp.where(kept, vals, jnp.zeros_like(vals))
    bits = nm_bits(m)
    dt = meta_dtype(n, m)
    meta = jnp.zeros((g, cols), jnp.uint32)
    for p in range(n):
        meta = meta | (order[:, p].astype(jnp.uint32) << jnp.uint32(bits * p))
    return jnp.transpose(vals, (1, 0, 2)), meta.astype(dt)


def nm_positions(meta, n: int, m: int):
    """[n, K/m, N] int32 in-group positions of each plane."""
    bits = nm_bits(m)
    mw = meta.astype(jnp.uint32)
    return jnp.stack([((mw >> jnp.uint32(bits * p)) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)
                      for p in range(n)])


def nm_decompress(values, meta, n: int, m: int, dtype=None):
    """The dense [K, N] matrix."""
    _, g, cols = values.shape
    pos = nm_positions(meta, n, m)  # [n, g, cols]
    onehot = pos[:, :, None, :] == jnp.arange(m, dtype=jnp.int32)[None, None, :, None]  # [n, g, m, cols]
    vals = values.astype(dtype or values.dtype)
    dense = jnp.sum(jnp.where(onehot, vals[:, :, None, :], jnp.zeros((), vals.dtype)), axis=0)
    return dense.reshape(g * m, cols)


def nm_matmul(x, values, meta, *, n: int, m: int, out_dtype=None):
    """x [..., K] @ W [K, N] (decompressed by XLA, then one dot, fp32 accumulation)."""
    w = nm_decompress(values, meta, n, m, x.dtype)
    y = jnp.einsum("...k,kn->...n", x, w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def sparsify_activations(x, threshold):
    """x with every entry of |x| <= threshold set to 0 (threshold: a scalar)."""
    t = jnp.asarray(threshold, jnp.float32)
    return jnp.where(jnp.abs(x.astype(jnp.float32)) > t, x, jnp.zeros((), x.dtype))


def act_sparse_matmul(x, w, threshold, *, out_dtype=None):
    """sparsify_activations(x) @ w [K, N], fp32 accumulation: the work a dense matmul would do."""
    xs = sparsify_activations(x, threshold)
    y = jnp.einsum("...k,kn->...n", xs, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def act_sparse_gather_matmul(x, w, threshold, capacity: int, *, out_dtype=None):
    """The same through XLA reading only `capacity` rows of w: the rows at the (at most
    `capacity`) largest surviving |x| of the single input row. Exact when at most `capacity`
    inputs survive; the XLA alternative a decode kernel has to beat. x: [1, K]."""
    xs = sparsify_activations(x, threshold)[0]
    mag = jnp.abs(xs.astype(jnp.float32))
    _, idx = jax.lax.top_k(mag, capacity)
    rows = jnp.take(w, idx, axis=0).astype(x.dtype)  # [capacity, N]: the only weight bytes read
    y = jnp.einsum("k,kn->n", xs[idx], rows, preferred_element_type=jnp.float32)[None]
    return y.astype(out_dtype or x.dtype)
