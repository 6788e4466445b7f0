"""SparseGPT (Frantar & Alistarh 2023): prune column by column and spread each pruned weight's
error over the inputs not yet processed, weighted by the inverse calibration Hessian.

This is a *rule* for the Optimal Brain Surgeon solver of `flashit_jax.quant.obs`, the same
solver GPTQ rounds with: where GPTQ maps a column to its grid, this rule maps it to 0 at the
pruned positions and leaves the rest (updated by earlier columns' errors) as they are.

Mask selection is adaptive, as in the paper: when the solver enters a block of `period`
inputs, the mask of that block is chosen from the *current* weights by the OBS saliency
w^2 / [H^-1]_jj (with [H^-1]_jj = U_jj^2, U the upper Cholesky factor of H^-1):
  unstructured: the `count` lowest entries of the [outputs, period] block (flattened);
  N:M (period = m): the m - n lowest of every output within the group.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.prune.methods import SparseGPT, group_count
from flashit_jax.quant import obs


@dataclasses.dataclass(frozen=True)
class SparseGPTRule:
    period: int  # inputs per mask block (m for N:M)
    count: int  # removed per block (unstructured: over the flattened block; N:M: per output row)
    per_row: bool = False  # N:M

    def refresh(self, w_cols, hinv_diag, start):
        score = w_cols * w_cols / hinv_diag[None, :]  # [N, period]
        if self.count == 0:
            return jnp.zeros(score.shape, bool)
        if self.per_row:
            _, idx = jax.lax.top_k(-score, self.count)  # [N, count]
            rows = jnp.arange(score.shape[0])[:, None]
            return jnp.zeros(score.shape, bool).at[rows, idx].set(True)
        _, idx = jax.lax.top_k(-score.reshape(-1), self.count)
        return jnp.zeros(score.size, bool).at[idx].set(True).reshape(score.shape)

    def round(self, w, pos, j, ctx):
        pruned = ctx[:, pos % self.period]
        return jnp.where(pruned, jnp.zeros_like(w), w), (~pruned).astype(jnp.int8)


def mask_block_for(k: int, target: int) -> int:
    """The largest divisor of k that is <= target (SparseGPT's 128 when it divides k)."""
    return max(d for d in range(1, min(k, target) + 1) if k % d == 0)


def sparsegpt_prune(w_kn, h, method: SparseGPT):
    """(pruned and updated w [K, N], keep bool [K, N], OBS loss) minimizing tr(E H E^T)."""
    w_kn = jnp.asarray(w_kn, jnp.float32)
    k, n = w_kn.shape
    if method.nm is not None:
        nk, m = method.nm
        rule = SparseGPTRule(period=m, count=m - nk, per_row=True)
    else:
        period = mask_block_for(k, method.mask_block)
        rule = SparseGPTRule(period=period, count=group_count(method.sparsity, n * period))
    sol = obs.solve(w_kn.T, h, rule, damp=method.damp)
    keep = np.asarray(sol.aux).T.astype(bool)
    return sol.q.T, keep, float(sol.loss)
