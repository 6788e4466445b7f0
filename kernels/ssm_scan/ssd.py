"""The chunked "state space dual" (SSD) form of the multi-head scan (Mamba-2, Dao & Gu 2024), pure jnp.

With one scalar decay per head (the multi-head layout: Δ [Bt, L, H], A [H]) the scan

    h_t = exp(Δ_t A) h_{t-1} + (Δ_t x_t) B_t        y_t = C_t · h_t + D x_t

is, inside a chunk of Q steps, a masked matmul: y = (L ∘ C Bᵀ) (Δ x) with
L[t, s] = exp(a_{s+1} + ... + a_t) for s ≤ t (a = Δ A), plus the state carried in from the
previous chunk, exp(a_0 + ... + a_t) C_t · H_prev. Chunk states are matmuls too, and only the
L / Q chunk boundaries are walked sequentially. So the work is mostly [Q, Q] and [Q, N] x [N, P]
matmuls instead of the O(L·H·P·N) elementwise state updates of `scan_chunked`: on a CPU
(and for training on a GPU) it is far cheaper, and autodiff gives the backward pass.

Every exponent is a difference of cumulative sums inside one chunk, so it is <= 0 (no overflow);
the upper triangle is masked *before* the exp, so no inf reaches the gradient.
All arithmetic is fp32; y has x's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ssd_scan(x, dt, A, B, C, D=None, h0=None, *, chunk: int = 64):
    """x [Bt, L, H, P], dt [Bt, L, H], A [H], B/C [Bt, L, G, N], D [H] or None, h0 [Bt, H, P, N] or None.

    Returns (y [Bt, L, H, P] in x's dtype, final state [Bt, H, P, N] fp32). Shapes are the
    multi-head layout of reference.py; `api.selective_scan(impl="ssd")` checks them first.
    """
    f32 = jnp.float32
    bt, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    q = min(chunk, l)
    pad = (-l) % q
    xs, dts, Bs, Cs = x.astype(f32), dt.astype(f32), B.astype(f32), C.astype(f32)
    if pad:  # Δ = 0 past the end: no input, no decay, the state passes through unchanged
        xs, dts, Bs, Cs = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (xs, dts, Bs, Cs))
    nc = (l + pad) // q
    # chunks, heads split as (group, head within group) so B and C are never repeated per head
    xs = xs.reshape(bt, nc, q, g, r, p)
    a = (dts * A.astype(f32)).reshape(bt, nc, q, g, r)
    dts = dts.reshape(bt, nc, q, g, r)
    Bs = Bs.reshape(bt, nc, q, g, n)
    Cs = Cs.reshape(bt, nc, q, g, n)
    xdt = xs * dts[..., None]

    acum = jnp.cumsum(a, axis=2)  # [bt, nc, q, g, r]
    ac = jnp.moveaxis(acum, 2, -1)  # [bt, nc, g, r, q]
    diff = ac[..., :, None] - ac[..., None, :]  # [.., t, s] = acum_t - acum_s
    causal = jnp.tril(jnp.ones((q, q), bool))
    decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))  # [bt, nc, g, r, t, s]

    hi = jax.lax.Precision.HIGHEST  # fp32 scan: keep the matmuls fp32 on GPUs too (TF32 would cost ~1e-3)
    cb = jnp.einsum("bctgn,bcsgn->bcgts", Cs, Bs, precision=hi)[:, :, :, None]  # shared by the group's heads
    y = jnp.einsum("bcgrts,bcsgrp->bctgrp", cb * decay, xdt, precision=hi)

    # state of each chunk from a zero start, and the decay across the whole chunk
    to_end = jnp.exp(ac[..., -1:] - ac)  # [bt, nc, g, r, q]
    states = jnp.einsum("bcgrs,bcsgn,bcsgrp->bcgrpn", to_end, Bs, xdt, precision=hi)
    chunk_decay = jnp.exp(ac[..., -1])  # [bt, nc, g, r]

    if h0 is None:
        h0 = jnp.zeros((bt, h, p, n), f32)
    h0 = h0.astype(f32).reshape(bt, g, r, p, n)

    def carry(hprev, inp):
        s, dcy = inp
        return dcy[..., None, None] * hprev + s, hprev

    h_final, h_in = jax.lax.scan(carry, h0, (jnp.moveaxis(states, 1, 0), jnp.moveaxis(chunk_decay, 1, 0)))
    h_in = jnp.moveaxis(h_in, 0, 1)  # [bt, nc, g, r, p, n]: the state entering each chunk
    y = y + jnp.einsum("bctgn,bcgrpn->bctgrp", Cs, h_in, precision=hi) * jnp.exp(acum)[..., None]
    y = y.reshape(bt, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y.astype(x.dtype), h_final.reshape(bt, h, p, n)
