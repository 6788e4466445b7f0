"""The chunked SSD form of the multi-head scan (kernels/ssm_scan/ssd.py) against the sequential reference.

Tolerances: fp32; SSD sums the same terms in another order and computes the decays as exponentials of
differences of cumulative sums (each exact to ~1e-7 relative), so outputs, final state and gradients
agree to 1e-5 of the largest reference value at these sizes. bf16 inputs are upcast by both, so the
only extra error is the final bf16 rounding of y (2^-8): 1e-2.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssm_scan import reference, selective_scan as _selective_scan


def _jit(fn, **static):
    """jitted: eager dispatch of the scans' many small ops is what costs time on a CPU."""
    return jax.jit(functools.partial(fn, **static))


def selective_scan(x, dt, A, B, C, D, *, initial_state=None, **kw):
    return _jit(_selective_scan, **kw)(x, dt, A, B, C, D, initial_state=initial_state)


def _reference(x, dt, A, B, C, D, *, initial_state=None, **kw):
    return _jit(reference.selective_scan, **kw)(x, dt, A, B, C, D, initial_state=initial_state)


def _inputs(bt, l, h, g, p, n, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(k[0], (bt, l, h, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (bt, l, h)) - 1.0).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(k[2], (h,)))
    B = jax.random.normal(k[3], (bt, l, g, n)).astype(dtype)
    C = jax.random.normal(k[4], (bt, l, g, n)).astype(dtype)
    D = jax.random.normal(k[5], (h,))
    h0 = jax.random.normal(k[6], (bt, h, p, n))
    return x, dt, A, B, C, D, h0


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=tol * float(np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("l,chunk", [(1, 64), (37, 8), (64, 64), (100, 16)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_ssd_matches_reference(l, chunk, dtype, tol):
    args = _inputs(2, l, 4, 2, 8, 16, dtype)
    x, dt, A, B, C, D, h0 = args
    y, h = selective_scan(x, dt, A, B, C, D, initial_state=h0, return_final_state=True, impl="ssd", chunk=chunk)
    yr, hr = _reference(x, dt, A, B, C, D, initial_state=h0, return_final_state=True)
    assert y.dtype == x.dtype and h.dtype == jnp.float32
    _close(y, yr, tol)
    _close(h, hr, 1e-5)  # the state is fp32 in both: only summation order differs


def test_ssd_gradients_match_reference():
    args = _inputs(2, 37, 4, 2, 8, 16, jnp.float32, seed=1)

    def loss(impl):
        def f(x, dt, A, B, C, D, h0):
            y, h = _selective_scan(x, dt, A, B, C, D, initial_state=h0, return_final_state=True, impl=impl, chunk=8)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(h))
        return f

    got = jax.jit(jax.grad(loss("ssd"), argnums=tuple(range(7))))(*args)
    want = jax.jit(jax.grad(loss("reference"), argnums=tuple(range(7))))(*args)
    for g, w in zip(got, want):
        assert bool(jnp.all(jnp.isfinite(g)))
        _close(g, w, 1e-5)


def test_ssd_zero_decay_and_strong_decay_are_finite():
    """A = 0 (no decay: linear attention) and a very strong decay (exp underflows to 0) stay exact and finite."""
    x, dt, _, B, C, D, h0 = _inputs(1, 20, 2, 1, 4, 8, jnp.float32, seed=2)
    for A in (jnp.zeros((2,)), jnp.full((2,), -1e4)):
        y, h = selective_scan(x, dt, A, B, C, D, initial_state=h0, return_final_state=True, impl="ssd", chunk=8)
        yr, hr = _reference(x, dt, A, B, C, D, initial_state=h0, return_final_state=True)
        _close(y, yr, 1e-5)
        _close(h, hr, 1e-5)
        g = jax.jit(jax.grad(lambda a: jnp.sum(_selective_scan(x, dt, a, B, C, D, impl="ssd", chunk=8))))(A)
        assert bool(jnp.all(jnp.isfinite(g)))
