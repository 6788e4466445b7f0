"""Structured pruning: a smaller config and smaller shapes whose outputs equal the masked full
model; the model-wide counts; GQA-regular head units; clear errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError
from flashit_jax.prune import prune_model
from flashit_jax.prune import structured as st
from flashit_jax.quant import calibrate
from models import Model
from models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=96, head_dim=16,
                  tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
    model = Model(CFG)
    params = model.init_params(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 24)).astype(np.int32)  # calibrate takes whole batches of 4
    return model, params, tokens, calibrate(model, params, tokens, progress=False)


def logits(model, params, tokens):
    return np.asarray(model.forward(params, jnp.asarray(tokens))[0])


def test_compact_equals_masked_full_model(tiny):
    model, params, tokens, calib = tiny
    s = st.Structure.full(CFG, params)
    s.layers = [0, 2]  # layer 1 removed
    s.q[0], s.kv[0] = [0, 2, 3, 5], [0, 1]  # query unit: one head less per group
    s.q[2], s.kv[2] = [3, 4, 5], [1]  # kv unit: group 0 gone
    s.ffn[0] = list(range(0, 96, 2))
    s.ffn[2] = list(range(50))
    cfg2, small = st.compact(CFG, params, s)
    assert cfg2.n_layers == 2 and cfg2.layer_heads == ((4, 2), (3, 1)) and cfg2.layer_ffn_dims == (48, 50)
    assert small["layers"][1]["attn"]["k"]["w"].shape == (64, 16) and small["layers"][0]["mlp"]["down"]["w"].shape == (48, 64)
    assert cfg2.n_params < CFG.n_params
    assert cfg2.n_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(small))
    masked = st.mask(CFG, params, s)
    np.testing.assert_allclose(logits(Model(cfg2), small, tokens), logits(model, masked, tokens), rtol=2e-5,
                               atol=2e-5)
    # the smaller config builds exactly these shapes (so our loader's shape check accepts it)
    want = jax.eval_shape(lambda: Model(cfg2).init_params(jax.random.key(0)))
    assert jax.tree.map(lambda a: a.shape, want) == jax.tree.map(lambda a: a.shape, small)


# ffn-25 and kv-34 alone in the slow run: the combined recipe makes both cuts in the default run
@pytest.mark.parametrize("recipe", [pytest.param("ffn-25", marks=pytest.mark.slow), "heads-34",
                                    pytest.param("kv-34", marks=pytest.mark.slow), "depth-1", "ffn-25+kv-34+depth-1"])
def test_recipes_make_smaller_models_that_save_load_and_decode(tiny, recipe, tmp_path):
    from flashit_jax.generate import generate
    from flashit_jax.loading import load_model, save_model

    model, params, tokens, _ = tiny
    m2, p2, info = prune_model(model, params, recipe, tokens)
    b, a = info["before"], info["after"]
    assert a["n_params"] < b["n_params"] and m2.config.n_params == a["n_params"]
    if "ffn" in recipe:
        assert a["ffn_channels"] == b["ffn_channels"] - round(0.25 * b["ffn_channels"] * a["n_layers"] / b["n_layers"]) \
            or "depth" in recipe
    if recipe == "ffn-25":
        assert a["ffn_channels"] == 3 * 96 - 72
    if recipe == "heads-34":  # 0.34 * 18 = 6 heads = 3 units of (one query head from each of 2 groups)
        assert a["query_heads"] == 12 and a["kv_heads"] == 6
        assert all(q % kv == 0 and q // kv in (1, 2, 3) for q, kv in (m2.config.layer_heads or [(6, 2)]))
    if recipe == "kv-34":  # 6 heads = 2 whole KV groups of 3
        assert a["query_heads"] == 12 and a["kv_heads"] == 4
    if recipe == "depth-1":
        assert m2.config.n_layers == 2
    save_model(tmp_path / "m", m2.config, p2)
    back = load_model(str(tmp_path / "m"))
    assert back.config == m2.config
    np.testing.assert_array_equal(logits(back.model, back.params, tokens[:1]), logits(m2, p2, tokens[:1]))
    out = generate(m2, p2, [[1, 2, 3]], max_new_tokens=3)  # KV cache sized per layer from the config
    assert out.tokens.shape == (1, 3)


def test_scores_are_the_output_change_of_removing_one_unit(tiny):
    """A head's / channel's score is exactly the squared change of its layer's o / down output
    over the calibration tokens when that unit alone is removed."""
    model, params, tokens, calib = tiny
    _, _, aux = model.forward(params, jnp.asarray(tokens), collect=("inputs",))
    x_o = np.asarray(aux["inputs"]["layers/1/attn/o"], np.float64).reshape(-1, 96)
    wo = np.asarray(params["layers"][1]["attn"]["o"]["w"], np.float64)
    hs = st.head_scores(CFG, params, calib, 1)
    for h in (0, 4):
        sl = slice(h * 16, (h + 1) * 16)
        np.testing.assert_allclose(hs[h], np.sum((x_o[:, sl] @ wo[sl]) ** 2), rtol=1e-4)
    x_d = np.asarray(aux["inputs"]["layers/2/mlp/down"], np.float64).reshape(-1, 96)
    wd = np.asarray(params["layers"][2]["mlp"]["down"]["w"], np.float64)
    fs = st.ffn_scores(params, calib, 2)
    np.testing.assert_allclose(fs[7], np.sum(np.outer(x_d[:, 7], wd[7]) ** 2), rtol=1e-4)


def test_selection_removes_lowest_scores_model_wide(tiny):
    model, params, tokens, calib = tiny
    s = st.select_ffn(st.Structure.full(CFG, params), params, calib, 0.25, normalize="none")
    scores = {i: st.ffn_scores(params, calib, i) for i in range(3)}
    gone = np.concatenate([scores[i][np.setdiff1d(np.arange(96), s.ffn[i])] for i in range(3)])
    kept = np.concatenate([scores[i][s.ffn[i]] for i in range(3)])
    assert len(gone) == 72 and gone.max() <= kept.min()


def test_layer_influence_is_one_minus_cosine(tiny):
    model, params, tokens, _ = tiny
    infl = st.layer_influence(model, params, tokens)
    assert infl.shape == (3,) and np.all((infl > 0) & (infl < 2))
    # an identity layer (o and down zeroed) has influence 0 and is the one depth-1 removes
    s = st.Structure.full(CFG, params)
    s.layers = [0, 2]
    masked = st.mask(CFG, params, s)
    infl = st.layer_influence(model, masked, tokens)
    assert abs(infl[1]) < 1e-4  # cos = 1 up to the 1e-6 guard in its denominator
    assert st.select_layers(st.Structure.full(CFG, params), infl, 1).layers == [0, 2]


def test_structured_bad_input(tiny):
    model, params, tokens, calib = tiny
    full = st.Structure.full(CFG, params)
    with pytest.raises(FlashitError, match="removes every attention head"):
        st.compact(CFG, params, dataclasses.replace(full, q={**full.q, 1: []}))
    with pytest.raises(FlashitError, match="every FFN channel"):
        st.compact(CFG, params, dataclasses.replace(full, ffn={**full.ffn, 0: []}))
    with pytest.raises(FlashitError, match="not all in KV group"):
        st.compact(CFG, params, dataclasses.replace(full, q={**full.q, 0: [0, 3, 1, 4]}))
    with pytest.raises(FlashitError, match="at most 12 can go"):  # 2 of 3 query heads per group at most
        prune_model(model, params, "heads-90", tokens)
    with pytest.raises(FlashitError, match="at most 9 can go"):  # one of two KV groups (3 heads) per layer at most
        prune_model(model, params, "kv-90", tokens)
    with pytest.raises(FlashitError, match=r"sparsity must be in \[0, 1\)"):
        prune_model(model, params, "heads-100", tokens)
    with pytest.raises(FlashitError, match="remove between 0 and 2"):
        prune_model(model, params, "depth-3", tokens)
    with pytest.raises(FlashitError, match="calibration tokens"):
        prune_model(model, params, "ffn-25", None)
    with pytest.raises(FlashitError, match="before unstructured"):
        prune_model(model, prune_model(model, params, "magnitude-50")[1], "ffn-25", tokens)
    with pytest.raises(ValueError, match="layer_heads"):
        dataclasses.replace(CFG, layer_heads=((6, 2),))
