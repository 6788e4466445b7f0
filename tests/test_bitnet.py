"""BitNet b1.58: the packed TernaryArray computes what the QAT forward pass computes, gradients
pass straight through, `quantize(params, "bitnet")` and save/load work, finetune trains it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, nn, tree
from flashit_jax.quant import TernaryArray, quantize, size_bytes
from flashit_jax.quant import ternary as T


def _rand(shape, seed=0, scale=0.05):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_linear_equals_qat_forward(per_channel):
    w, x = _rand((64, 32), 1), _rand((3, 5, 64), 2, 1.0)
    packed = T.quantize_ternary(w, per_channel=per_channel)
    assert packed.packed.dtype == jnp.uint8 and packed.packed.shape == (64, 8)
    assert packed.scale.shape == ((1, 32) if per_channel else (1, 1))
    t = np.asarray(packed.values())
    assert set(np.unique(t)) <= {-1, 0, 1} and 0.2 < np.mean(t == 0) < 0.6  # absmean: ~1/3 zeros for a gaussian
    y_packed = nn.linear(x, packed)
    y_qat = nn.linear(x, T.BitLinearQAT(w, per_channel))
    # int32 accumulation vs an fp32 dot of the same integers times the same scales
    np.testing.assert_allclose(np.asarray(y_packed), np.asarray(y_qat), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(packed.dequantize()), t * np.asarray(packed.scale), rtol=0, atol=0)


def test_kernel_path_in_the_weight_type():
    w, x = _rand((64, 64), 3), _rand((4, 64), 4, 1.0)
    packed = T.quantize_ternary(w)
    with T.set_impl("interpret"):
        y_kernel = nn.linear(x, packed)
    np.testing.assert_allclose(np.asarray(y_kernel), np.asarray(nn.linear(x, packed)), rtol=1e-6)


def test_straight_through_gradients():
    w, x = _rand((32, 16), 5), _rand((4, 32), 6, 1.0)
    gw, gx = jax.grad(lambda w, x: jnp.sum(nn.linear(x, T.BitLinearQAT(w)) ** 2), argnums=(0, 1))(w, x)
    # d/dW of sum((xq @ Wq)^2) with identity through both quantizers: xq^T (2 y)
    xq = T.fake_int8_rows(x)
    y = nn.linear(x, T.BitLinearQAT(w))
    np.testing.assert_allclose(np.asarray(gw), np.asarray(xq.T @ (2 * y)), rtol=1e-4, atol=1e-6)
    assert float(jnp.linalg.norm(gx)) > 0


def test_bitnet_recipe_quantizes_linears_only_and_saves(tmp_path):
    from flashit_jax.loading import load_model, save_model
    from models import Model
    from models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_position=64,
                      tie_embeddings=True)
    model = Model(cfg)
    params = model.init_params(jax.random.key(0))
    q = quantize(params, "bitnet")
    flat = tree.flatten(q)
    assert isinstance(flat["layers/1/mlp/down/w"], TernaryArray) and not tree.is_leaf_weight(flat["embed/w"])
    # 2 bits a weight plus one fp32 scale per matrix; embedding and norms as bf16
    n_lin = sum(int(np.prod(v.shape)) for k, v in tree.flatten(params).items() if "/attn/" in k or "/mlp/" in k)
    assert size_bytes(q) == size_bytes(params) - 2 * n_lin + n_lin // 4 + 4 * 14
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
    logits, _, _ = model.forward(q, tokens)
    save_model(tmp_path / "m", cfg, q)
    back = load_model(str(tmp_path / "m"))
    assert isinstance(tree.flatten(back.params)["layers/0/attn/q/w"], TernaryArray)
    again, _, _ = back.model.forward(back.params, tokens)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


def test_bad_input():
    with pytest.raises(FlashitError, match="4 output columns"):
        T.quantize_ternary(_rand((8, 6)))
    with pytest.raises(FlashitError, match="embedding"):
        quantize({"embed": {"w": _rand((16, 8))}}, [(r"embed/w", {"method": "bitnet"})])
    with pytest.raises(ValueError, match="packed is"):
        TernaryArray.create(jnp.zeros((8, 3), jnp.uint8), jnp.ones((1, 1)), shape=(8, 16), dtype=jnp.float32)
    with pytest.raises(FlashitError, match="ternary"):
        nn.embed(jnp.zeros((2,), jnp.int32), T.quantize_ternary(_rand((8, 16))))
