"""LoRA / QLoRA as a pytree transform: zero-initialised B changes nothing, the adapted model
equals base + scale * x A B, merging gives the adapted model, bad rules are clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, lora, tree
from flashit_jax.quant import quantize, size_bytes

RULES = [(r"layers/\d+/(attn|mlp)/\w+/w", lora.LoRA(rank=4, alpha=8.0))]


@pytest.fixture(scope="module")
def tiny():
    from models import Model
    from models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_position=64,
                      tie_embeddings=True)
    m = Model(cfg)
    return m, m.init_params(jax.random.key(0))


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)


def _randomize_b(adapters, seed=1):
    flat = tree.flatten(adapters)
    out = {}
    for i, (k, v) in enumerate(flat.items()):
        out[k] = v if k.endswith("/a") else 0.05 * jax.random.normal(jax.random.key(seed + i), v.shape, v.dtype)
    return tree.unflatten(out)


def test_adapters_match_the_rules(tiny):
    _, params = tiny
    ad = lora.init_adapters(params, RULES, jax.random.key(0))
    paths = lora.adapter_paths(ad)
    assert len(paths) == 2 * 7 and "layers/0/attn/q/w" in paths and "embed/w" not in paths
    a, b = ad["layers"][1]["mlp"]["down"]["w"]["a"], ad["layers"][1]["mlp"]["down"]["w"]["b"]
    assert a.shape == (64, 4) and b.shape == (4, 32) and not np.any(np.asarray(b))
    assert lora.n_adapter_params(ad) == sum(4 * sum(params["layers"][0][blk][n]["w"].shape)
                                            for blk, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                                            for n in names) * 2


def test_zero_b_leaves_outputs_unchanged(tiny):
    model, params = tiny
    ad = lora.init_adapters(params, RULES, jax.random.key(0))
    adapted = lora.attach(params, ad, lora.scale_of(RULES, ad))
    want, _, _ = model.forward(params, _tokens())
    got, _, _ = model.forward(adapted, _tokens())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_adapted_linear_is_base_plus_low_rank():
    from flashit_jax import nn

    rng = np.random.default_rng(3)
    w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 8), (16, 2), (2, 8)))
    x = jnp.asarray(rng.normal(size=(3, 16)), jnp.float32)
    y = nn.linear(x, lora.LoRAWeight(w, a, b, 0.5))
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w + 0.5 * (x @ a) @ b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["float", "w4g16"])
def test_merge_equals_adapted_model(tiny, base):
    model, params = tiny
    frozen = params if base == "float" else quantize(params, base)
    ad = _randomize_b(lora.init_adapters(params, RULES, jax.random.key(0)))
    adapted = lora.attach(frozen, ad, lora.scale_of(RULES, ad))
    got, _, _ = model.forward(adapted, _tokens())
    base_out, _, _ = model.forward(frozen, _tokens())
    assert float(jnp.max(jnp.abs(got - base_out))) > 1e-3  # the adapters do something
    merged32 = lora.merge(adapted, jnp.float32)
    assert all(not tree.is_leaf_weight(v) for v in tree.flatten(merged32).values())
    m32, _, _ = model.forward(merged32, _tokens())
    np.testing.assert_allclose(np.asarray(m32), np.asarray(got), rtol=1e-4, atol=1e-4)  # fp32 reassociation
    m16, _, _ = model.forward(lora.merge(adapted, jnp.bfloat16), _tokens())
    # bf16 weights (8-bit mantissa): logits within bf16 rounding of the weights, ~1e-2 relative
    assert float(jnp.max(jnp.abs(m16 - got))) < 2e-2 * float(jnp.max(jnp.abs(got)))
    # requantizing the merged model is a separate, explicit step
    rq = quantize(lora.merge(adapted, jnp.float32), "w4g16")
    assert tree.is_leaf_weight(tree.flatten(rq)["layers/0/attn/q/w"])


def test_detach_inverts_attach_and_size_counts_adapters(tiny):
    _, params = tiny
    q = quantize(params, "w4g16")
    ad = lora.init_adapters(params, RULES, jax.random.key(0))
    adapted = lora.attach(q, ad, 2.0)
    b2, ad2, scales = lora.detach(adapted)
    assert set(scales.values()) == {2.0}
    for k, v in tree.flatten(ad).items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(ad2)[k]), np.asarray(v))
    assert size_bytes(adapted) == size_bytes(q) + 2 * lora.n_adapter_params(ad)
    assert size_bytes(b2) == size_bytes(q)


def test_adapter_gradients_reach_a_and_b_only(tiny):
    model, params = tiny
    q = quantize(params, "w4g16")
    ad = _randomize_b(lora.init_adapters(params, RULES, jax.random.key(0)))
    scales = lora.scale_of(RULES, ad)

    def loss(ad):
        logits, _, _ = model.forward(lora.attach(q, ad, scales), _tokens())
        return jnp.mean(logits**2)

    g = jax.grad(loss)(ad)
    norms = {k: float(jnp.linalg.norm(v)) for k, v in tree.flatten(g).items()}
    assert all(v > 0 for v in norms.values())


def test_save_and_load_adapters(tiny, tmp_path):
    _, params = tiny
    ad = _randomize_b(lora.init_adapters(params, RULES, jax.random.key(0)))
    p = lora.save_adapters(tmp_path / "ad.safetensors", ad, {"rank": 4})
    back, meta = lora.load_adapters(p)
    assert meta == {"rank": 4}
    for k, v in tree.flatten(ad).items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(back)[k]), np.asarray(v))


def test_bad_input(tiny):
    _, params = tiny
    with pytest.raises(FlashitError, match="match no matrix"):
        lora.init_adapters(params, [(r"nothing/\d+", lora.LoRA())], jax.random.key(0))
    with pytest.raises(FlashitError, match="linear layers"):
        lora.init_adapters(params, [(r"embed/w", lora.LoRA())], jax.random.key(0))
    with pytest.raises(FlashitError, match="not a valid regex"):
        lora.init_adapters(params, [(r"(", lora.LoRA())], jax.random.key(0))
    with pytest.raises(FlashitError, match="rank must be"):
        lora.LoRA(rank=0)
    ad = lora.init_adapters(params, RULES, jax.random.key(0))
    adapted = lora.attach(params, ad, 1.0)
    with pytest.raises(FlashitError, match="already carries"):
        lora.attach(adapted, ad, 1.0)
