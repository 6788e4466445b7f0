"""GPTQ (Frantar et al. 2022): round-to-nearest on a grid, column by column, with the OBS update
of `obs.solve` spreading each column's error over the columns not yet rounded.

Group parameters are chosen when the solver reaches a group's first column, from the weights as
updated so far (the reference implementation's behaviour); with act-order (columns by
decreasing Hessian diagonal) they are fixed up front from the original weights ("static
groups"), so that groups stay contiguous and the stored format is unchanged.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from flashit_jax.quant import obs
from flashit_jax.quant.rtn import codes_for, group_params, quantize_groups, to_qarray, values_for


@dataclasses.dataclass(frozen=True)
class GPTQRule:
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: str
    static: bool = False  # ctx0 holds every group's (scale, zero) [G, N]

    @property
    def period(self):
        return None if self.static else self.group_size

    def refresh(self, w_cols, hinv_diag, start):
        s, z = group_params(w_cols.T, bits=self.bits, symmetric=self.symmetric, scale_dtype=jnp.dtype(self.scale_dtype))
        return s, (jnp.zeros_like(s) if z is None else z)

    def round(self, w, pos, j, ctx):
        s, z = ctx
        if self.static:
            s, z = s[j // self.group_size], z[j // self.group_size]
        z = None if self.symmetric else z
        c = codes_for(w, s, z, bits=self.bits)
        return values_for(c, s, z), c


def gptq_quantize(w_kn, h, *, bits: int, group_size: int, symmetric: bool, axis: int, shape, dtype,
                  scale_dtype: str = "float16", damp: float = 0.01, act_order: bool = False,
                  clip: bool = False, block_size: int | None = None):
    """QArray of w [K, N] (stored orientation) minimizing the output error under H [K, K].

    clip: with static groups (act-order or per channel), choose each group's range by AWQ's
    clipping search (output error on the group's block of H) instead of min/max.

    Returns (QArray, obs.Solution) so that callers can report the OBS loss.
    """
    w_kn = jnp.asarray(w_kn, jnp.float32)
    k, n = w_kn.shape
    static = act_order or group_size == k
    ctx0 = None
    if static:
        ratios = None
        if clip:
            from flashit_jax.quant.smooth import awq_clip

            ratios = awq_clip(w_kn, h, bits=bits, group_size=group_size, symmetric=symmetric,
                              scale_dtype=jnp.dtype(scale_dtype))
        _, s0, z0 = quantize_groups(w_kn, ratios, bits=bits, group_size=group_size, symmetric=symmetric,
                                    scale_dtype=jnp.dtype(scale_dtype))
        ctx0 = (s0, jnp.zeros_like(s0) if z0 is None else z0)
    rule = GPTQRule(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=str(jnp.dtype(scale_dtype)),
                    static=static)
    sol = obs.solve(w_kn.T, h, rule, block_size=block_size, damp=damp, act_order=act_order, ctx0=ctx0)
    s, z = ctx0 if static else sol.ctxs
    q = to_qarray(sol.aux.T, s, None if symmetric else z, bits=bits, group_size=group_size, symmetric=symmetric,
                  axis=axis, shape=shape, dtype=dtype, scale_dtype=jnp.dtype(scale_dtype))
    return q, sol
