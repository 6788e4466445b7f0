"""AQLM (Egiazarian et al. 2024): additive codebooks over groups of d weights, learned per layer.

Each column n of W [K, N] is scaled to unit RMS (scale s_n, fp16); its K weights are cut into
G = K / d vectors, each approximated by the sum of one entry from each of M codebooks of 2^B
entries (`kernels.aqlm.reference` has the format). The objective is the layer's output error
on calibration data, sum_n s_n^2 (w_n - w^_n) H (w_n - w^_n)^T, with H = sum x x^T. Rounds of

1. codes: a sequential pass over the groups with OBS error feedback (the solver GPTQ uses,
   `quant.obs`, here with d columns fixed at a time, as GPTVQ does): with U the upper Cholesky
   factor of H^-1, group g's vectors are quantized under the metric ||(w - q) U_gg^-1||^2 and
   the error E = (w - q) U_gg^-1 is spread over the later columns, W[:, later] -= E U[g, later].
   Each vector's codes come from a beam search over the codebooks (keep the `beam` best partial
   sums after each codebook), then one pass of coordinate descent (each code re-chosen with the
   others fixed; never worse).
2. codebooks: with the codes fixed the objective is quadratic in the codebooks; conjugate
   gradient on its normal equations, with the full H (not a diagonal approximation).

Codebooks start from residual k-means on the scaled weight vectors. The round with the lowest
objective is kept. Not done here (AQLM's paper does it): fine-tuning the codebooks and norms
end to end through the whole model after every layer is quantized.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.nn.aqarray import AQArray
from flashit_jax.quant import obs
from kernels.aqlm.reference import code_dtype

HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- initialization
@functools.partial(jax.jit, static_argnames=("entries", "iters"))
def _kmeans(x, init, *, entries: int, iters: int):
    """Lloyd's k-means of x [P, d] from `init` [E, d]; empty clusters keep their centroid."""
    def assign(c):
        d2 = jnp.sum(c * c, -1)[None, :] - 2.0 * jnp.dot(x, c.T, precision=HI)
        return jnp.argmin(d2, axis=1)

    def step(_, c):
        a = assign(c)
        sums = jax.ops.segment_sum(x, a, num_segments=entries)
        cnt = jax.ops.segment_sum(jnp.ones(x.shape[0], jnp.float32), a, num_segments=entries)
        return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], c)

    c = jax.lax.fori_loop(0, iters, step, init)
    return c, assign(c)


def init_codebooks(vectors, *, num_codebooks: int, bits: int, iters: int, seed: int, max_points: int = 8192):
    """Residual k-means: codebook m clusters what codebooks < m leave."""
    rng = np.random.default_rng(seed)
    x = np.asarray(vectors, np.float32)
    if len(x) > max_points:
        x = x[rng.choice(len(x), max_points, replace=False)]
    x = jnp.asarray(x)
    e = 2**bits
    out = []
    for _ in range(num_codebooks):
        pick = rng.choice(x.shape[0], e, replace=x.shape[0] < e)
        init = x[pick] + (0.0 if x.shape[0] >= e else 1e-3 * jnp.asarray(rng.standard_normal((e, x.shape[1])),
                                                                             jnp.float32))
        c, a = _kmeans(x, init, entries=e, iters=iters)
        x = x - c[a]
        out.append(c)
    return jnp.stack(out)


# ----------------------------------------------------------------------------- codes
def _beam_search(wt, ct, beam: int):
    """Codes [N, M] minimizing ||wt - sum_m ct[m, code_m]||^2 (wt [N, d], ct [M, E, d])."""
    n = wt.shape[0]
    m_cb, e, _ = ct.shape
    cn = jnp.sum(ct * ct, -1)  # [M, E]
    r = wt[:, None, :]  # [N, beams, d] residuals
    codes = jnp.zeros((n, 1, 0), jnp.int32)
    for m in range(m_cb):
        s = jnp.sum(r * r, -1)[:, :, None] - 2.0 * jnp.einsum("nbd,ed->nbe", r, ct[m], precision=HI) + cn[m]
        keep = 1 if m == m_cb - 1 else min(beam, s.shape[1] * e)
        _, top = jax.lax.top_k(-s.reshape(n, -1), keep)
        b_idx, e_idx = top // e, top % e
        r = jnp.take_along_axis(r, b_idx[:, :, None], axis=1) - ct[m][e_idx]
        codes = jnp.concatenate([jnp.take_along_axis(codes, b_idx[:, :, None], axis=1), e_idx[:, :, None]], -1)
    codes = codes[:, 0, :]
    for m in range(m_cb):  # coordinate descent: re-choose each code with the others fixed
        others = sum(ct[j][codes[:, j]] for j in range(m_cb) if j != m) if m_cb > 1 else 0.0
        t = wt - others
        codes = codes.at[:, m].set(jnp.argmin(cn[m][None, :] - 2.0 * jnp.dot(t, ct[m].T, precision=HI), axis=1))
    return codes


@functools.partial(jax.jit, static_argnames=("d", "beam"))
def sequential_codes(w, u, cbs, *, d: int, beam: int):
    """Codes [M, G, N] for w [N, K] (scaled), OBS error feedback through u (upper, U^T U = H^-1)."""
    n, k = w.shape
    g_total = k // d
    m_cb = cbs.shape[0]
    cols = jnp.arange(k)
    eye = jnp.eye(d, dtype=jnp.float32)

    def step(g, carry):
        w, codes, loss = carry
        i0 = g * d
        wg = jax.lax.dynamic_slice(w, (0, i0), (n, d))
        ugg = jax.lax.dynamic_slice(u, (i0, i0), (d, d))
        linv = jax.scipy.linalg.solve_triangular(ugg, eye, lower=False)  # U_gg^-1 (upper)
        code = _beam_search(jnp.dot(wg, linv, precision=HI), jnp.einsum("med,df->mef", cbs, linv, precision=HI),
                            beam)
        q = sum(cbs[m][code[:, m]] for m in range(m_cb))
        err = jnp.dot(wg - q, linv, precision=HI)
        urow = jax.lax.dynamic_slice(u, (i0, 0), (d, k))
        w = w - jnp.where((cols >= i0 + d)[None, :], jnp.dot(err, urow, precision=HI), 0.0)
        return w, codes.at[:, g, :].set(code.T), loss + 0.5 * jnp.sum(err * err)

    init = (w, jnp.zeros((m_cb, g_total, n), jnp.int32), jnp.zeros((), jnp.float32))
    _, codes, loss = jax.lax.fori_loop(0, g_total, step, init)
    return codes, loss


# ----------------------------------------------------------------------------- codebooks
def _decode(cbs, codes):
    """[N, K] from codebooks [M, E, d] and codes [M, G, N] (unit scales)."""
    m_cb, g, n = codes.shape
    vec = sum(cbs[m][codes[m]] for m in range(m_cb))  # [G, N, d]
    return jnp.transpose(vec, (1, 0, 2)).reshape(n, g * cbs.shape[2])


def _decode_t(e_nk, codes, entries: int, d: int):
    """Adjoint of `_decode`: [N, K] -> [M, E, d]."""
    m_cb, g, n = codes.shape
    ev = jnp.transpose(e_nk.reshape(n, g, d), (1, 0, 2)).reshape(g * n, d)
    return jnp.stack([jax.ops.segment_sum(ev, codes[m].reshape(-1), num_segments=entries) for m in range(m_cb)])


def objective(w, cbs, codes, h, sw):
    """sum_n sw_n (w_n - w^_n) H (w_n - w^_n)^T."""
    e = w - _decode(cbs, codes)
    return jnp.sum(sw[:, None] * jnp.dot(e, h, precision=HI) * e)


@functools.partial(jax.jit, static_argnames=("iters",))
def update_codebooks(w, cbs, codes, h, sw, *, iters: int):
    """Conjugate gradient on the normal equations of `objective` in the codebooks (codes fixed)."""
    entries, d = cbs.shape[1], cbs.shape[2]

    def op(c):
        return _decode_t(sw[:, None] * jnp.dot(_decode(c, codes), h, precision=HI), codes, entries, d)

    rhs = _decode_t(sw[:, None] * jnp.dot(w, h, precision=HI), codes, entries, d)
    r = rhs - op(cbs)
    p = r
    rr = jnp.sum(r * r)

    def step(_, carry):
        c, r, p, rr = carry
        ap = op(p)
        pap = jnp.sum(p * ap)
        alpha = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        c = c + alpha * p
        r = r - alpha * ap
        rr_new = jnp.sum(r * r)
        p = r + jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0) * p
        return c, r, p, rr_new

    c, *_ = jax.lax.fori_loop(0, iters, step, (cbs, r, p, rr))
    return c


# ----------------------------------------------------------------------------- one matrix
def aqlm_quantize(w_kn, h, *, num_codebooks: int, bits: int, group_size: int, beam: int, rounds: int,
                  kmeans_iters: int, cg_iters: int, damp: float, seed: int, shape, dtype):
    """(AQArray, info) for w [K, N] (stored orientation = logical [in, out]) under Hessian h [K, K]."""
    w_kn = jnp.asarray(w_kn, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    k, n = w_kn.shape
    d = group_size
    dead = jnp.diag(h) == 0
    w_kn = jnp.where(dead[:, None], 0.0, w_kn)
    rms = jnp.sqrt(jnp.mean(w_kn * w_kn, axis=0))
    s = jnp.where(rms > 0, rms, 1.0).astype(jnp.float16).astype(jnp.float32)
    w = (w_kn / s).T  # [N, K], unit-RMS rows
    sw = s * s
    for attempt in range(4):
        u, _ = obs.damped_inverse_cholesky(h, damp * 10**attempt)
        if bool(jnp.all(jnp.isfinite(u))):
            break
    else:
        raise FloatingPointError("the damped Hessian is not positive definite even with 1000x damping")
    hd = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    hd = hd + jnp.eye(k, dtype=jnp.float32) * (damp * jnp.mean(jnp.diag(hd)))
    cbs = init_codebooks(w.reshape(-1, d), num_codebooks=num_codebooks, bits=bits, iters=kmeans_iters, seed=seed)
    best = None
    history = []
    for _ in range(rounds):
        codes, _ = sequential_codes(w, u, cbs, d=d, beam=beam)
        cbs = update_codebooks(w, cbs, codes, hd, sw, iters=cg_iters)
        cb16 = cbs.astype(jnp.float16).astype(jnp.float32)
        f = float(objective(w, cb16, codes, hd, sw))
        history.append(f)
        if best is None or f < best[0]:
            best = (f, cb16, codes)
    f, cbs, codes = best
    ref = float(jnp.sum(sw[:, None] * jnp.dot(w, hd, precision=HI) * w))  # error of W^ = 0
    q = AQArray.create(jnp.asarray(np.asarray(codes).astype(code_dtype(bits))), cbs.astype(jnp.float16),
                       s.astype(jnp.float16)[None, :], bits=bits, shape=shape, dtype=dtype)
    return q, {"objective": f, "relative_error": f / max(ref, 1e-30), "rounds": history}
