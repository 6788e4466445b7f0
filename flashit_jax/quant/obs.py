"""Optimal Brain Surgeon column solver: the core GPTQ and SparseGPT share.

Given a weight W [N, K] (rows = outputs, columns = the K inputs, as in the GPTQ paper) and
the Hessian of the layer's squared output error, H = sum_t x_t x_t^T [K, K], columns are
fixed one at a time (to a grid point, or to zero when pruning) and the error of each is
spread over the columns not yet fixed, weighted by the inverse Hessian:

    err_j = (w_j - q_j) / U_jj          U = upper Cholesky factor of H^-1 (damped)
    W[:, j+1:] -= err_j U[j, j+1:]

"Lazy batch" updates: inside a block of `block_size` columns the update touches only the
block; the rest of W gets one matrix product per block (E_block @ U[block, later]).

What to do with each column is pluggable, so that SparseGPT (pruning) reuses this file. A
rule is a frozen (hashable) object with
    period            None, or refresh `ctx` every `period` columns (a quantization group;
                      SparseGPT's mask block); must divide `block_size`
    refresh(w_cols [N, period], hinv_diag [period], start) -> ctx     (current weights)
    round(w [N], pos, j, ctx) -> (q [N], aux [N])
where pos is the position in processing order and j the column's original index (they differ
with act-order). `aux` (e.g. integer codes) is returned per column; each refresh's ctx is
returned stacked, in processing order.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Solution(NamedTuple):
    q: jax.Array  # [N, K] the fixed columns, original order
    aux: jax.Array  # [N, K] the rule's per-column aux output, original order
    ctxs: Any  # stacked refresh contexts [K // period, ...] (processing order), or None
    loss: jax.Array  # sum_j ||w_j - q_j||^2 / U_jj^2 / 2: the OBS estimate of the output error


def damped_inverse_cholesky(h, damp: float):
    """Upper U with U^T U = (H + damp * mean(diag H) I)^-1; dead inputs (H_jj = 0) get H_jj = 1."""
    k = h.shape[0]
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    h = h + jnp.eye(k, dtype=h.dtype) * (damp * jnp.mean(jnp.diag(h)))
    # H = R R^T with R upper (the Cholesky factor of H with rows and columns reversed, reversed
    # back), so H^-1 = R^-T R^-1 = U^T U with U = R^-1: one factorization, one triangular inverse.
    r = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    u = jax.scipy.linalg.solve_triangular(r, jnp.eye(k, dtype=h.dtype), lower=False)
    return u, dead


@functools.partial(jax.jit, static_argnames=("rule", "block_size"))
def _solve(w, u, perm, ctx0, *, rule, block_size: int):
    n, k = w.shape
    bsz = block_size
    period = rule.period or bsz
    n_blocks, per_block = k // bsz, bsz // period
    w = w[:, perm]
    if rule.period:
        ctx_shape = jax.eval_shape(lambda: rule.refresh(w[:, :period], jnp.ones((period,), w.dtype), 0))
    else:
        ctx_shape = jax.eval_shape(lambda: ctx0)
    aux_dtype = jax.eval_shape(
        lambda: rule.round(w[:, 0], 0, 0, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), ctx_shape)))[1].dtype
    n_periods = k // period
    ctxs0 = jax.tree.map(lambda a: jnp.zeros((n_periods, *a.shape), a.dtype), ctx_shape)
    cols = jnp.arange(k)

    def block(b, carry):
        w, q, aux, ctxs, loss = carry
        i1 = b * bsz
        w1 = jax.lax.dynamic_slice(w, (0, i1), (n, bsz))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bsz, bsz))
        udiag = jnp.diag(u1)

        def group(p, gcarry):
            w1, q1, a1, e1, ctxs, loss = gcarry
            c0 = p * period
            ctx = ctx0
            if rule.period:
                ctx = rule.refresh(jax.lax.dynamic_slice(w1, (0, c0), (n, period)),
                                   jax.lax.dynamic_slice(udiag, (c0,), (period,)) ** 2, i1 + c0)
                ctxs = jax.tree.map(lambda s, c: s.at[(i1 + c0) // period].set(c), ctxs, ctx)

            def column(c, ccarry):
                w1, q1, a1, e1, loss = ccarry
                col = c0 + c
                pos = i1 + col
                wc = w1[:, col]
                d = u1[col, col]
                qc, ac = rule.round(wc, pos, perm[pos], ctx)
                err = (wc - qc) / d
                w1 = w1 - err[:, None] * u1[col][None, :]
                return (w1, q1.at[:, col].set(qc), a1.at[:, col].set(ac.astype(a1.dtype)),
                        e1.at[:, col].set(err), loss + 0.5 * jnp.sum(err * err))

            w1, q1, a1, e1, loss = jax.lax.fori_loop(0, period, column, (w1, q1, a1, e1, loss))
            return w1, q1, a1, e1, ctxs, loss

        init = (w1, jnp.zeros_like(w1), jnp.zeros((n, bsz), aux_dtype), jnp.zeros_like(w1), ctxs, loss)
        _, q1, a1, e1, ctxs, loss = jax.lax.fori_loop(0, per_block, group, init)
        later = (cols >= i1 + bsz)[None, :]
        w = w - jnp.where(later, e1 @ jax.lax.dynamic_slice(u, (i1, 0), (bsz, k)), 0.0)
        q = jax.lax.dynamic_update_slice(q, q1, (0, i1))
        aux = jax.lax.dynamic_update_slice(aux, a1, (0, i1))
        return w, q, aux, ctxs, loss

    init = (w, jnp.zeros_like(w), jnp.zeros((n, k), aux_dtype), ctxs0, jnp.zeros((), jnp.float32))
    _, q, aux, ctxs, loss = jax.lax.fori_loop(0, n_blocks, block, init)
    inv = jnp.argsort(perm)
    return q[:, inv], aux[:, inv], (ctxs if rule.period else None), loss


def pick_block_size(k: int, period: int | None, target: int = 128) -> int:
    """The largest divisor of K that is <= max(target, period) and a multiple of `period`."""
    step = period or 1
    best = None
    for b in range(step, k + 1, step):
        if k % b == 0 and (b <= max(target, step)):
            best = b
    return best or k


def solve(w, h, rule, *, block_size: int | None = None, damp: float = 0.01, act_order: bool = False,
          ctx0=None) -> Solution:
    """Fix every column of w [N, K] with `rule`, compensating through H [K, K] (see module doc).

    Dead inputs (H_jj = 0) are zeroed first. act_order processes columns by decreasing H_jj
    (rules with a `period` then see groups of *permuted* columns: use a static ctx0 instead).
    The Cholesky factorization is retried with 10x the damping when it fails.
    """
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian {h.shape} does not match {k} input columns")
    if rule.period and k % rule.period:
        raise ValueError(f"refresh period {rule.period} does not divide {k} columns")
    bsz = block_size or pick_block_size(k, rule.period)
    if k % bsz or (rule.period and bsz % rule.period):
        raise ValueError(f"block size {bsz} must divide K={k} and be a multiple of the period {rule.period}")
    if act_order and rule.period:
        raise ValueError("act-order needs a rule with static context (period=None)")
    dead = jnp.diag(h) == 0
    w = jnp.where(dead[None, :], 0.0, w)
    perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
    hp = h[perm][:, perm] if act_order else h
    for attempt in range(4):
        u, _ = damped_inverse_cholesky(hp, damp * 10**attempt)
        if bool(jnp.all(jnp.isfinite(u))):
            break
    else:
        raise FloatingPointError("the damped Hessian is not positive definite even with 1000x damping")
    q, aux, ctxs, loss = _solve(w, u, perm.astype(jnp.int32), ctx0, rule=rule, block_size=bsz)
    return Solution(q, aux, ctxs, loss)


def output_error(w, q, h) -> float:
    """sum_t ||x_t (w - q)^T||^2 = tr((w - q) H (w - q)^T) for w, q [N, K]: what OBS minimizes."""
    e = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum((e @ np.asarray(h, np.float64)) * e))
