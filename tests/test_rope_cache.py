"""The decode step's rotary embedding + KV-cache write kernel (kernels/attention/rope_cache.py), interpreted
on CPU, against `nn.apply_rope` + `nn.cache.write_slots`, and in a model's decode step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax.nn.cache import write_slots
from flashit_jax.nn.rope import RopeScaling, apply_rope, inv_frequencies
from kernels.attention import rope_cache


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scaling", [None, RopeScaling("llama3", factor=8.0, original_max_position=64)])
def test_rope_and_write_matches_xla(dtype, scaling):
    """Rotated q, the rotated key and the value at slot lengths[b] of each cache; a full cache's write is
    dropped (row 1), as write_slots drops it. fp32: the kernel's cos/sin may differ from XLA's by an ulp."""
    b, hq, hkv, d, slots = 3, 8, 2, 32, 10
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, 1, h, d)), dtype) for h in (hq, hkv, hkv))
    kc, vc = (jnp.asarray(rng.normal(size=(b, slots, hkv, d)), dtype) for _ in range(2))
    lengths = jnp.array([3, slots, 0], jnp.int32)
    pos = jnp.array([[3], [517], [0]], jnp.int32)
    inv = inv_frequencies(d, 10000.0, scaling)
    got = rope_cache.rope_and_write(q, k, v, pos, lengths, kc, vc, inv, interpret=True)
    want = (apply_rope(q, pos, inv), write_slots(kc, apply_rope(k, pos, inv), lengths), write_slots(vc, v, lengths))
    tol = 1e-6 if dtype == jnp.float32 else 0.0
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(got[1][1], np.float32), np.asarray(kc[1], np.float32))  # dropped


def test_unsupported_and_switch(monkeypatch):
    q = jnp.zeros((1, 2, 4, 32))
    k = jnp.zeros((1, 2, 2, 32))
    kc = jnp.zeros((1, 8, 2, 32))
    inv = inv_frequencies(32, 1e4)
    assert "new tokens" in rope_cache.supported(q, k, k, kc, inv)
    assert "partial rotary" in rope_cache.supported(q[:, :1], k[:, :1], k[:, :1], kc, inv[:8])
    assert "int8" in rope_cache.supported(q[:, :1], k[:, :1], k[:, :1], kc.astype(jnp.int8), inv)
    with pytest.raises(ValueError, match="new tokens"):
        rope_cache.rope_and_write(q, k, k, jnp.zeros((1, 2), jnp.int32), jnp.zeros(1, jnp.int32), kc, kc, inv)
    monkeypatch.setenv("FLASHIT_JAX_ROPE_KERNEL", "yes")
    with pytest.raises(ValueError, match="FLASHIT_JAX_ROPE_KERNEL must be"):
        rope_cache.mode()
    monkeypatch.setenv("FLASHIT_JAX_ROPE_KERNEL", "1")
    assert rope_cache.mode() == ""  # no GPU here: the XLA ops


@pytest.mark.parametrize("cache_dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow), jnp.int8])
def test_decode_steps_through_the_kernel(monkeypatch, cache_dtype):
    """Three decode steps of a Llama with FLASHIT_JAX_ROPE_KERNEL=interpret: the logits and the cache of the
    XLA ops (the int8 cache keeps the XLA path: it quantizes what it stores)."""
    from models import Model
    from models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    m = Model(cfg)
    dt = jnp.float32 if cache_dtype == jnp.int8 else cache_dtype
    p = m.init_params(jax.random.key(0), dt)

    def run():
        cache = m.init_cache(1, 8, cache_dtype, params=p)
        _, cache, _ = m.forward(p, jnp.array([[5, 17]]), cache=cache)
        out = []
        for tok in (3, 9, 11):
            logits, cache, _ = m.forward(p, jnp.array([[tok]]), cache=cache)
            out.append(logits)
        return jnp.stack(out), cache

    monkeypatch.setenv("FLASHIT_JAX_ROPE_KERNEL", "0")
    want, want_cache = run()
    monkeypatch.setenv("FLASHIT_JAX_ROPE_KERNEL", "interpret")
    got, got_cache = run()
    tol = 1e-5 if dt == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


def test_rope_cache_lowers_to_triton():
    S = jax.ShapeDtypeStruct
    inv = inv_frequencies(64, 5e5)
    fn = jax.jit(lambda q, k, v, pos, ln, kc, vc: rope_cache.rope_and_write(q, k, v, pos, ln, kc, vc, inv))
    bf = jnp.bfloat16
    exp = jax.export.export(fn, platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((1, 1, 32, 64), bf), S((1, 1, 8, 64), bf), S((1, 1, 8, 64), bf), S((1, 1), jnp.int32), S((1,), jnp.int32),
        S((1, 4096, 8, 64), bf), S((1, 4096, 8, 64), bf))
    text = exp.mlir_module()
    assert "xla.gpu.triton" in text and "output_operand_alias" in text
