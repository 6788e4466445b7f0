"""Choosing an attention implementation, bad input, and the kernels wired into the model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, nn
from flashit_jax.generate import generate
from kernels.attention import api, reference
from models import Model
from models.llama import LlamaConfig


def _qkv(b=1, t=16, hq=4, hkv=2, d=64, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype),
            jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(dtype),
            jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(dtype))


def test_auto_is_xla_on_cpu():
    q, k, v = _qkv()
    assert jax.default_backend() == "cpu"
    assert api.choose(q, k, v, q_positions=None, kv_lengths=None, causal=True) == "xla"


def test_supports_names_the_argument():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    pos = jnp.zeros((1, 16), jnp.int32)
    assert "q_positions" in api.supports("cudnn", q, k, v, q_positions=pos, kv_lengths=None)
    assert "kv_lengths" in api.supports("pallas_mgpu", q, k, v, q_positions=None, kv_lengths=jnp.ones((1,), jnp.int32))
    q48, k48, v48 = _qkv(d=48)
    assert "head_dim 48" in api.supports("pallas", q48, k48, v48, q_positions=None, kv_lengths=None)
    assert api.supports("xla", q48, k48, v48, q_positions=None, kv_lengths=None) is None


def test_pallas_mask_is_served_by_xla():
    q, k, v = _qkv()
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, (1, 1, 16, 16)) | jnp.eye(16, dtype=bool)[None, None]
    got = nn.attention(q, k, v, mask=mask, impl="pallas")
    want = reference.attention(q, k, v, q_positions=None, kv_lengths=None, mask=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda: (*_qkv(hq=3, hkv=2), {}), r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    (lambda: (*_qkv(d=48), {"impl": "pallas"}), r"impl 'pallas' cannot serve.*head_dim 48"),
    (lambda: (_qkv()[0], *_qkv(dtype=jnp.bfloat16)[1:], {}), r"dtype mismatch.*float32.*bfloat16"),
    (lambda: (*_qkv(), {"window": 0}), r"window must be >= 1"),
    (lambda: (*_qkv(), {"impl": "flash"}), r"unknown impl 'flash'"),
    (lambda: (*_qkv(), {"q_positions": jnp.zeros((1, 3), jnp.int32)}), r"q_positions must be \[B, Tq\]"),
])
def test_bad_input_names_the_problem(make, match):
    q, k, v, kw = make()
    with pytest.raises(FlashitError, match=match):
        nn.attention(q, k, v, **kw)


# ----------------------------------------------------------------------------- in the model
CFG = LlamaConfig(vocab_size=97, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=64,
                  tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
    m = Model(CFG)
    p = m.init_params(jax.random.key(1))
    return m, jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, p)


def test_forward_pallas_equals_xla(tiny):
    """Training layout (no cache, q_positions=None) with packed segments."""
    m, p = tiny
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 97)
    seg = jnp.asarray([[0] * 10 + [1] * 14, [0] * 24], jnp.int32)
    want, _, _ = m.forward(p, tokens, segment_ids=seg, attn_impl="xla")
    got, _, _ = m.forward(p, tokens, segment_ids=seg, attn_impl="pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_greedy_generation_pallas_equals_xla(tiny):
    """Prefill into the cache (flash kernel) and one-token steps (flash-decoding), ragged prompts."""
    m, p = tiny
    prompts = [[5, 17, 3, 44, 9], [1, 2], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
    want = generate(m, p, prompts, max_new_tokens=8, cache_dtype=jnp.float32, attn_impl="xla")
    got = generate(m, p, prompts, max_new_tokens=8, cache_dtype=jnp.float32, attn_impl="pallas")
    assert got.tokens.tolist() == want.tokens.tolist()
    assert len(set(want.tokens.reshape(-1).tolist())) > 3
