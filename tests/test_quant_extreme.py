"""Hadamard incoherence and AQLM codebooks against their defining properties (tiny layers and a tiny Llama)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, tree
from flashit_jax.nn import linear
from flashit_jax.nn.hadamard import (
    RotatedWeight,
    factor,
    hadamard_matrix,
    random_signs,
    rotation,
    transform,
)
from flashit_jax.quant import (
    AQLM,
    GPTQ,
    RTN,
    AQArray,
    QArray,
    calibrate,
    obs,
    quantize,
    size_bytes,
)
from flashit_jax.quant import hadamard as had
from flashit_jax.quant.quantize import quantize_leaf
from models import Model
from models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=128, dim=48, n_layers=2, n_heads=3, n_kv_heads=1, ffn_dim=80, tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
    """dim 48 = 12 * 4, ffn 80 = 20 * 4, head_dim 16: Paley and Sylvester sizes; outlier norm channels."""
    model = Model(TINY)
    params = model.init_params(jax.random.key(0))
    flat = tree.flatten(params)
    rng = np.random.default_rng(0)
    for i in range(TINY.n_layers):
        for norm in ("attn_norm", "mlp_norm"):
            s = np.ones(TINY.dim, np.float32)
            s[rng.choice(TINY.dim, 3, replace=False)] = 20.0
            flat[f"layers/{i}/{norm}/scale"] = jnp.asarray(s)
    params = tree.unflatten(flat)
    tokens = rng.integers(0, TINY.vocab_size, (8, 32)).astype(np.int32)
    calib = calibrate(model, params, tokens, batch_size=4, progress=False)
    return model, params, calib, jnp.asarray(tokens[:2])


def _logits(model, params, tokens):
    return model.forward(params, tokens)[0]


# ----------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 28, 36, 24, 40, 56, 72, 576, 1536])
def test_hadamard_matrices_are_orthogonal(n):
    h = hadamard_matrix(n)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))
    r = rotation(n, random_signs(n, 3))
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("n", [16, 36, 80, 576])
def test_fast_transform_equals_dense_rotation(n):
    x = np.random.default_rng(n).normal(size=(3, 2, n)).astype(np.float32)
    s = random_signs(n, 1)
    y = transform(jnp.asarray(x), jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(y), x @ rotation(n, s), rtol=0, atol=2e-6 * np.abs(x).max())
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("n", [0, 3, 5, 44, 100, 11 * 256])
def test_bad_hadamard_size_is_a_clear_error(n):
    with pytest.raises(FlashitError, match=rf"no Hadamard matrix of size {n}.*m \* 2\^k with m in"):
        factor(n)


def test_bad_hadamard_size_in_a_recipe():
    params = {"layers": {0: {"mlp": {"down": {"w": jnp.ones((44, 8), jnp.float32)}}}}}
    with pytest.raises(FlashitError, match=r"Hadamard rotation of layers/0/mlp/down/w \(input dimension 44\)"):
        quantize(params, [(r".*/w", RTN(bits=4, group_size=None, symmetric=False, hadamard=True))])
    with pytest.raises(FlashitError, match="AWQ's scales and a Hadamard"):
        quantize(params, "w4g4-hadamard-awq")


def test_rotated_weight_computes_the_same_linear():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(36, 10)), jnp.float32)
    s = random_signs(36, 5)
    rw = RotatedWeight(inner=had.rotate_input(w, s), signs=jnp.asarray(s))
    x = jnp.asarray(rng.normal(size=(2, 3, 36)), jnp.float32)
    np.testing.assert_allclose(np.asarray(linear(x, rw)), np.asarray(x @ w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rw.dequantize()), np.asarray(w), atol=1e-5)
    h = jnp.asarray(rng.normal(size=(36, 36)), jnp.float32)
    r = rotation(36, s)
    np.testing.assert_allclose(np.asarray(had.rotate_hessian(h, s)), r.T @ np.asarray(h) @ r, atol=1e-4)


def test_folding_leaves_the_float_model_unchanged(tiny):
    model, params, calib, tokens = tiny
    folded = had.fold_model(params, TINY, seed=1)
    f0, f1 = tree.flatten(params), tree.flatten(folded)
    assert not np.allclose(np.asarray(f0["layers/0/attn/v/w"]), np.asarray(f1["layers/0/attn/v/w"]))
    assert not np.allclose(np.asarray(f0["layers/1/attn/o/w"]), np.asarray(f1["layers/1/attn/o/w"]))
    np.testing.assert_array_equal(np.asarray(f0["layers/0/attn/q/w"]), np.asarray(f1["layers/0/attn/q/w"]))
    np.testing.assert_allclose(np.asarray(_logits(model, folded, tokens)), np.asarray(_logits(model, params, tokens)),
                               rtol=1e-4, atol=1e-4)


def test_hadamard_spreads_weight_outliers():
    """Incoherence: heavy-tailed weights (Student t, 2 dof) stretch their RTN grids; rotated, they do not."""
    w = jnp.asarray(np.random.default_rng(0).standard_t(2, size=(128, 32)) * 0.02, jnp.float32)
    rot = had.rotate_input(w, random_signs(128, 0))
    peak = lambda a: float(jnp.max(jnp.abs(a)) / jnp.sqrt(jnp.mean(a * a)))  # noqa: E731
    assert peak(rot) < 0.5 * peak(w)
    for group, gain in ((None, 0.4), (64, 0.5)):
        err = {}
        for h in (False, True):
            q = quantize_leaf("layers/0/mlp/down/w", w, RTN(bits=3, group_size=group, symmetric=False, hadamard=h))
            assert isinstance(q, RotatedWeight) == h
            err[h] = float(jnp.linalg.norm(q.dequantize(jnp.float32) - w))
        assert err[True] < gain * err[False]


@pytest.mark.slow  # 20-100 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_hadamard_recipes_on_a_model(tiny):
    model, params, calib, tokens = tiny
    q = quantize(params, "w3g16-hadamard-gptq", calib)
    leaf = tree.flatten(q)["layers/0/mlp/down/w"]
    assert isinstance(leaf, RotatedWeight) and isinstance(leaf.inner, QArray) and leaf.inner.bits == 3
    # q/k/v share signs (one rotation of their common input would serve all three)
    flat = tree.flatten(q)
    np.testing.assert_array_equal(np.asarray(flat["layers/0/attn/q/w"].signs), np.asarray(flat["layers/0/attn/v/w"].signs))
    assert size_bytes(q) - size_bytes(quantize(params, "w3g16")) == sum(
        v.signs.size for v in flat.values() if isinstance(v, RotatedWeight))
    # GPTQ on the rotated matrix with the rotated Hessian beats RTN on the rotated matrix
    path = "layers/1/mlp/down/w"
    w = tree.flatten(params)[path]
    h = calib.get(path).h
    e = {m: obs.output_error(w.T, quantize_leaf(path, w, m, calib).dequantize(jnp.float32).T, h)
         for m in (RTN(bits=3, group_size=16, symmetric=False, hadamard=True),
                   GPTQ(bits=3, group_size=16, hadamard=True))}
    rtn_e, gptq_e = e.values()
    assert gptq_e < 0.8 * rtn_e
    ref = _logits(model, params, tokens)
    rel = float(jnp.linalg.norm(_logits(model, q, tokens) - ref) / jnp.linalg.norm(ref))
    assert rel < 0.5


# ----------------------------------------------------------------------------- AQLM
def test_aqlm_bits_and_recipe_errors():
    for bits in (0, 17, -1):
        with pytest.raises(FlashitError, match=r"codebook bits must be in 1\.\.16"):
            AQLM(codebook_bits=bits)
    with pytest.raises(FlashitError, match=r"codebook bits must be in 1\.\.16 .*got 17"):
        quantize({"w": jnp.ones((8, 8))}, "aqlm-2x17")
    with pytest.raises(FlashitError, match="at least one codebook"):
        AQLM(num_codebooks=0)
    params = {"layers": {0: {"mlp": {"down": {"w": jnp.ones((20, 8), jnp.float32)}}}}}
    with pytest.raises(FlashitError, match="vectors of 8 weights do not divide the input dimension 20"):
        quantize(params, "aqlm-2x8", calib=object())
    with pytest.raises(ValueError, match="codebook bits must be in 1..16"):
        AQArray.create(jnp.zeros((2, 1, 4), jnp.uint16), jnp.zeros((2, 2**17, 8)), jnp.ones((1, 4)), bits=17,
                       shape=(8, 4), dtype=jnp.float32)


def _layer(k=64, n=48, t=512, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.normal(size=(t, k)) @ a * rng.uniform(0.3, 2.0, k)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, jnp.float32)
    return w, jnp.asarray(x.T @ x)


def test_aqlm_learns_codes_and_codebooks():
    from flashit_jax.quant import aqlm

    w, h = _layer()
    kw = dict(num_codebooks=2, bits=5, group_size=8, beam=4, kmeans_iters=5, cg_iters=8, damp=0.01, seed=0,
              shape=w.shape, dtype=jnp.float32)
    _, info1 = aqlm.aqlm_quantize(w, h, rounds=1, **kw)
    q3, info3 = aqlm.aqlm_quantize(w, h, rounds=3, **kw)
    assert isinstance(q3, AQArray) and q3.codes.dtype == jnp.uint8 and q3.codes.shape == (2, 8, 48)
    assert info3["objective"] <= info1["objective"] * (1 + 1e-6)
    # the stored weight is what the objective measured
    wq = q3.dequantize(jnp.float32)
    assert obs.output_error(w.T, wq.T, h) == pytest.approx(info3["objective"], rel=0.05)
    # codebook update: the conjugate-gradient step lowers the objective of fixed codes
    s = np.sqrt(np.mean(np.asarray(w) ** 2, axis=0))
    wn = jnp.asarray((np.asarray(w) / s).T)
    u, _ = obs.damped_inverse_cholesky(h, 0.01)
    cbs = aqlm.init_codebooks(wn.reshape(-1, 8), num_codebooks=2, bits=5, iters=5, seed=0)
    codes, _ = aqlm.sequential_codes(wn, u, cbs, d=8, beam=4)
    sw = jnp.asarray(s * s, jnp.float32)
    before = float(aqlm.objective(wn, cbs, codes, h, sw))
    after = float(aqlm.objective(wn, aqlm.update_codebooks(wn, cbs, codes, h, sw, iters=8), codes, h, sw))
    assert after < 0.9 * before
    # 2x5 codebooks over 8 weights (1.25 bits/weight) beat 2-bit RTN on the calibration output error
    rtn = quantize_leaf("layers/0/mlp/down/w", w, RTN(bits=2, group_size=16, symmetric=False))
    assert obs.output_error(w.T, wq.T, h) < obs.output_error(w.T, rtn.dequantize(jnp.float32).T, h)


def test_aqlm_beam_search_matches_exhaustive_on_tiny_codebooks():
    from flashit_jax.quant.aqlm import _beam_search

    rng = np.random.default_rng(0)
    ct = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)
    codes = np.asarray(_beam_search(wt, ct, beam=8))  # beam = all first-codebook entries: exact
    sums = np.asarray(ct[0])[:, None, :] + np.asarray(ct[1])[None, :, :]  # [8, 8, d]
    d = ((np.asarray(wt)[:, None, None, :] - sums[None]) ** 2).sum(-1).reshape(50, -1)
    got = ((np.asarray(wt) - sums[codes[:, 0], codes[:, 1]]) ** 2).sum(-1)
    np.testing.assert_allclose(got, d.min(1), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 20-100 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_aqlm_on_a_model_and_save_load(tmp_path, tiny):
    from flashit_jax.loading import load_model, save_model

    model, params, calib, tokens = tiny
    q = quantize(params, [(r"layers/\d+/(attn|mlp)/[^/]+/w", AQLM(num_codebooks=2, codebook_bits=4, cg_iters=4,
                                                                   kmeans_iters=3))], calib)
    leaf = tree.flatten(q)["layers/0/attn/q/w"]
    assert isinstance(leaf, AQArray) and leaf.num_codebooks == 2 and leaf.bits == 4
    ref = _logits(model, params, tokens)
    rel = float(jnp.linalg.norm(_logits(model, q, tokens) - ref) / jnp.linalg.norm(ref))
    assert rel < 0.6
    qh = quantize(params, "w3g16-hadamard", calib)
    for name, p in (("aqlm", q), ("had", qh)):
        save_model(tmp_path / name, TINY, p)
        back = load_model(str(tmp_path / name)).params
        np.testing.assert_array_equal(np.asarray(_logits(model, back, tokens)), np.asarray(_logits(model, p, tokens)))
    meta = json.loads((tmp_path / "aqlm" / "quant_aqlm.json").read_text())
    assert meta["layers/0/mlp/up/w"]["bits"] == 4
    meta["layers/0/mlp/up/w"]["bits"] = 20
    (tmp_path / "aqlm" / "quant_aqlm.json").write_text(json.dumps(meta))
    with pytest.raises(FlashitError, match="invalid AQLM tensor.*codebook bits must be in 1..16, got 20"):
        load_model(str(tmp_path / "aqlm"))
