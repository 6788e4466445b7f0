"""QArray as a weight type: pytree behaviour, dispatch in linear/embed/unembed, checks, LLM.int8."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import nn, tree
from flashit_jax.nn.qarray import QArray, matmul_impl
from flashit_jax.quant import rtn
from kernels.qmatmul import reference as ref


def _rand(shape, seed=0, scale=0.05):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _q(w, bits=4, group=32, symmetric=False, axis=0, **kw):
    w_kn = w if axis == 0 else w.T
    return rtn.quantize_kn(w_kn, bits=bits, group_size=group, symmetric=symmetric, axis=axis, shape=w.shape,
                           dtype=jnp.float32, **kw)


def test_pytree_leaf_and_jit():
    w = _rand((64, 32))
    q = _q(w)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 3  # qvalues, scales, zeros
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert (rebuilt.shape, rebuilt.packing, rebuilt.group_size) == (q.shape, q.packing, q.group_size)
    params = {"layers": {0: {"attn": {"q": {"w": q}}}}}
    flat = tree.flatten(params)
    assert list(flat) == ["layers/0/attn/q/w"] and flat["layers/0/attn/q/w"] is q
    out = jax.jit(lambda p, x: nn.linear(x, p["layers"][0]["attn"]["q"]["w"]))(params, jnp.ones((2, 64)))
    assert out.shape == (2, 32)
    assert q.shape == (64, 32) and q.dtype == jnp.float32 and q.nbytes == 64 * 16 + 2 * 2 * 32 * 2


def test_linear_equals_dense_of_dequantized():
    w = _rand((128, 64), 1)
    x = _rand((3, 5, 128), 2, 1.0)
    for bits, sym in [(8, True), (4, False), (4, True), (3, False), (2, False)]:
        q = _q(w, bits=bits, symmetric=sym)
        want = nn.linear(x, q.dequantize())
        np.testing.assert_array_equal(np.asarray(nn.linear(x, q)), np.asarray(want))
        with matmul_impl("interpret"):
            if bits in (4, 8):
                got = nn.linear(x, q)
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_embed_and_unembed_on_table():
    table = _rand((96, 64), 3)
    ids = jnp.asarray([[0, 5, 95], [17, 48, 49]], jnp.int32)
    x = _rand((2, 3, 64), 4, 1.0)
    for bits, sym in [(8, True), (4, False), (3, False)]:
        q = _q(table, bits=bits, symmetric=sym, axis=1)
        dense = q.dequantize()
        assert dense.shape == (96, 64)
        np.testing.assert_array_equal(np.asarray(nn.embed(ids, q)), np.asarray(jnp.take(dense, ids, axis=0)))
        np.testing.assert_allclose(np.asarray(nn.unembed(x, q)), np.asarray(nn.unembed(x, dense)), rtol=1e-6,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="embedding table"):
        nn.linear(x, _q(table, axis=1))


def test_validation_errors():
    w = _rand((64, 32))
    q = _q(w)
    with pytest.raises(ValueError, match="qvalues"):
        QArray.create(q.qvalues[:, :8], q.scales, q.zeros, bits=4, group_size=32, axis=0, shape=(64, 32),
                      dtype=jnp.float32, packing="u4x2")
    with pytest.raises(ValueError, match="group size 24 does not divide"):
        QArray.create(q.qvalues, q.scales, q.zeros, bits=4, group_size=24, axis=0, shape=(64, 32),
                      dtype=jnp.float32, packing="u4x2")
    with pytest.raises(ValueError, match="scales"):
        QArray.create(q.qvalues, q.scales[:1], q.zeros[:1], bits=4, group_size=32, axis=0, shape=(64, 32),
                      dtype=jnp.float32, packing="u4x2")
    with pytest.raises(ValueError, match="x has 63 features"):
        nn.linear(jnp.ones((1, 63)), q)


def _int8_weight(w, act, threshold=6.0):
    return rtn.quantize_kn(w, bits=8, group_size=w.shape[0], symmetric=True, axis=0, shape=w.shape,
                           dtype=jnp.float32, scale_dtype="float32", act=act, threshold=threshold)


def test_llm_int8_without_outliers_equals_w8a8():
    w = _rand((64, 48), 5)
    x = _rand((4, 64), 6, 1.0)  # |x| < 6 everywhere
    assert float(jnp.max(jnp.abs(x))) < 6.0
    a = nn.linear(x, _int8_weight(w, "llm-int8"))
    b = nn.linear(x, _int8_weight(w, "int8"))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_llm_int8_outlier_columns_in_float():
    w = _rand((64, 48), 7)
    x = np.asarray(_rand((4, 64), 8, 1.0)).copy()
    x[1, 5], x[2, 40] = 30.0, -12.0  # columns 5 and 40 are outliers in this batch
    x = jnp.asarray(x)
    qw = _int8_weight(w, "llm-int8")
    wd = qw.dequantize()
    mask = np.zeros(64, bool)
    mask[[5, 40]] = True
    xo, xr = jnp.where(mask, x, 0.0), jnp.where(mask, 0.0, x)
    xq, sx = ref.quantize_rows_int8(xr)
    want = ref.int8_matmul(xq, sx, qw.qvalues, qw.scales) + xo @ wd
    np.testing.assert_allclose(np.asarray(nn.linear(x, qw)), np.asarray(want), rtol=1e-6, atol=1e-6)
    # and the outliers do not wreck the result: close to the float product with int8 weights
    naive = nn.linear(x, _int8_weight(w, "int8"))
    exact = x @ wd
    assert float(jnp.linalg.norm(nn.linear(x, qw) - exact)) < 0.5 * float(jnp.linalg.norm(naive - exact))


def test_fp8_weight_roundtrip_bound():
    w = _rand((64, 32), 9)
    q = rtn.quantize_fp8(w, axis=0, shape=w.shape, dtype=jnp.float32)
    assert q.qvalues.dtype == jnp.float8_e4m3fn
    s = np.asarray(q.scales)
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals (< 2^-6 * s) absolute 2^-10 * s
    assert np.all(err <= np.maximum(np.abs(np.asarray(w)) * 2.0**-4, 2.0**-10 * s) * (1 + 1e-6))
