"""The reference attention against an independent per-head loop and jax.nn.dot_product_attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, nn


def _naive(q, k, v, qpos, kvlen, causal, window, seg, softcap):
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(tq):
                s = np.array([q[bi, i, h] @ k[bi, j, kh] for j in range(k.shape[1])], np.float64) / np.sqrt(d)
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                ok = np.arange(k.shape[1]) < kvlen[bi]
                if causal:
                    ok &= np.arange(k.shape[1]) <= qpos[bi, i]
                if window:
                    ok &= qpos[bi, i] - np.arange(k.shape[1]) < window
                if seg is not None:
                    ok &= seg[bi] == seg[bi, i]
                if not ok.any():
                    continue
                p = np.exp(s[ok] - s[ok].max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, ok, kh]
    return out


@pytest.mark.parametrize("hq,hkv,causal,window,use_seg,softcap", [
    (4, 4, True, None, False, None), (4, 1, False, None, False, None), (8, 2, True, 3, False, None),
    (4, 2, True, None, True, None), (4, 2, True, None, False, 5.0),
])
def test_reference_matches_naive(hq, hkv, causal, window, use_seg, softcap):
    rng = np.random.default_rng(0)
    b, t, d = 2, 9, 8
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
    qpos = np.tile(np.arange(t), (b, 1)).astype(np.int32)
    kvlen = np.array([t, 6], np.int32)
    seg = np.array([[1] * 4 + [2] * 5, [1] * 9], np.int32) if use_seg else None
    got = nn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions=jnp.asarray(qpos),
                       kv_lengths=jnp.asarray(kvlen), causal=causal, window=window,
                       segment_ids=None if seg is None else jnp.asarray(seg), softcap=softcap)
    want = _naive(q, k, v, qpos, kvlen, causal, window, seg, softcap)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_reference_matches_jax_dot_product_attention():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 16, 8, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 16, 2, 32)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 16, 2, 32)), jnp.float32)
    pos = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
    got = nn.attention(q, k, v, q_positions=pos, kv_lengths=jnp.full((2,), 16, jnp.int32))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_decode_query_against_cache_slots():
    """One query at slot 5 of a 12-slot cache with 6 valid keys equals attention over those 6."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((1, 1, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32)
    got = nn.attention(q, k, v, q_positions=jnp.asarray([[5]], jnp.int32), kv_lengths=jnp.asarray([6], jnp.int32))
    want = nn.attention(q, k[:, :6], v[:, :6], q_positions=jnp.asarray([[5]], jnp.int32),
                        kv_lengths=jnp.asarray([6], jnp.int32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_shape_errors():
    q = jnp.zeros((1, 2, 3, 8))
    k = jnp.zeros((1, 2, 2, 8))
    with pytest.raises(FlashitError, match="q heads .3. must be a multiple of k/v heads .2."):
        nn.attention(q, k, k, q_positions=jnp.zeros((1, 2), jnp.int32), kv_lengths=jnp.ones((1,), jnp.int32))
