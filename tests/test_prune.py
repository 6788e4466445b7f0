"""Unstructured / N:M pruning against its defining properties: exact counts per comparison group,
the N:M pattern, lower calibration-output error for Wanda and SparseGPT than for magnitude,
sparse weight types through `linear`, storage, and clear errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, nn, tree
from flashit_jax.prune import (Magnitude, MaskedArray, NMArray, SparseGPT, Wanda, densify, masks_of, prune,
                               resparsify, sparsity)
from flashit_jax.prune.methods import group_count
from flashit_jax.quant import calibrate
from flashit_jax.quant.calib import Calibration, InputStats
from models import Model
from models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, tie_embeddings=True)


def layer_inputs(t, k, seed=0):
    """Correlated inputs with a few large-norm channels, as LLM activations have."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.normal(size=(t, k)) @ a * rng.uniform(0.2, 2.0, k)
    x[:, rng.choice(k, 3, replace=False)] *= 20.0
    return x.astype(np.float32)


def one_layer(k=96, n=40, t=2048, seed=0):
    x = layer_inputs(t, k, seed)
    w = (np.random.default_rng(seed + 1).normal(size=(k, n)) * 0.05).astype(np.float32)
    h = x.T @ x
    calib = Calibration({"lin": InputStats(jnp.asarray(h), jnp.max(jnp.abs(x), 0), jnp.sum(jnp.abs(x), 0), t)}, t)
    return x, w, calib


def run(method, w, calib):
    return prune({"lin": {"w": jnp.asarray(w)}}, [("lin/w", method)], calib)["lin"]["w"]


# ----------------------------------------------------------------------------- exact counts / patterns
@pytest.mark.parametrize("s", [0.5, 0.3, 0.77, 0.0])
def test_exact_sparsity_per_method(s):
    x, w, calib = one_layer(k=96, n=40)
    k, n = w.shape
    mag = run(Magnitude(sparsity=s), w, calib)
    assert isinstance(mag, MaskedArray)
    assert int(np.sum(~np.asarray(mag.mask))) == group_count(s, k * n)
    wanda = run(Wanda(sparsity=s), w, calib)  # per output column
    np.testing.assert_array_equal(np.sum(~np.asarray(wanda.mask), axis=0), group_count(s, k))
    sg = run(SparseGPT(sparsity=s, mask_block=32), w, calib)  # per block of 32 inputs (flattened over outputs)
    per_block = np.sum(~np.asarray(sg.mask).reshape(k // 32, 32, n), axis=(1, 2))
    np.testing.assert_array_equal(per_block, group_count(s, 32 * n))
    for a in (mag, wanda, sg):  # pruned weights are exactly zero, stored and computed
        assert np.all(np.asarray(a.w)[~np.asarray(a.mask)] == 0)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("cls", [Magnitude, Wanda, SparseGPT])
def test_n_of_m_pattern(cls, nm):
    x, w, calib = one_layer(k=64, n=24)
    n, m = nm
    out = run(cls(nm=nm), w, calib)
    assert isinstance(out, NMArray) and (out.n, out.m) == nm
    keep = np.asarray(out.mask).reshape(64 // m, m, 24)
    np.testing.assert_array_equal(keep.sum(axis=1), n)  # exactly n kept of every m inputs per output
    dense = np.asarray(out.dense())
    assert np.all(dense.reshape(64 // m, m, 24)[~keep] == 0)
    if cls is Magnitude:  # and the kept ones are the n largest |w| of each group
        g = np.abs(w).reshape(64 // m, m, 24)
        kth = np.sort(g, axis=1)[:, m - n][:, None, :]
        assert np.all(g[keep.astype(bool)].reshape(-1) >= kth.repeat(m, 1)[keep.astype(bool)].reshape(-1) - 1e-7)
        np.testing.assert_array_equal(dense[keep.reshape(64, 24)], w[keep.reshape(64, 24)])


def test_global_magnitude_one_threshold_over_matrices():
    rng = np.random.default_rng(0)
    params = {"a": {"w": jnp.asarray(rng.normal(size=(32, 16)) * 1.0, jnp.float32)},
              "b": {"w": jnp.asarray(rng.normal(size=(16, 48)) * 0.1, jnp.float32)}}
    out = prune(params, [(r"[ab]/w", Magnitude(sparsity=0.5, scope="global"))])
    ka, kb = np.asarray(out["a"]["w"].mask), np.asarray(out["b"]["w"].mask)
    assert (~ka).sum() + (~kb).sum() == (32 * 16 + 16 * 48) // 2
    assert (~kb).mean() > 0.7 > 0.2 > (~ka).mean()  # the small-scale matrix loses most
    kept = np.concatenate([np.abs(np.asarray(params["a"]["w"]))[ka], np.abs(np.asarray(params["b"]["w"]))[kb]])
    gone = np.concatenate([np.abs(np.asarray(params["a"]["w"]))[~ka], np.abs(np.asarray(params["b"]["w"]))[~kb]])
    assert kept.min() >= gone.max()


# ----------------------------------------------------------------------------- reconstruction error
@pytest.mark.parametrize("s,nm", [(0.5, None), (0.6, None), (None, (2, 4))])
def test_wanda_and_sparsegpt_beat_magnitude_on_calibration_outputs(s, nm):
    x, w, calib = one_layer(k=128, n=64, t=4096, seed=3)
    kw = {"nm": nm} if nm else {"sparsity": s}

    def err(method):
        q = run(method(**kw), w, calib)
        return float(np.linalg.norm(x @ (w - np.asarray(q.dense()))))

    e_mag, e_wanda, e_sgpt = err(Magnitude), err(Wanda), err(SparseGPT)
    assert e_wanda < 0.5 * e_mag  # (0.33-0.36x here)
    assert e_sgpt < 0.95 * e_wanda  # the OBS update also compensates what was removed (0.84-0.93x)


def test_sparsegpt_uses_the_shared_obs_solver(monkeypatch):
    """SparseGPT is a rule of quant.obs.solve (the GPTQ core), not a copy of it."""
    from flashit_jax.quant import obs

    calls = []
    real = obs.solve
    monkeypatch.setattr(obs, "solve", lambda *a, **k: calls.append(type(a[2]).__name__) or real(*a, **k))
    x, w, calib = one_layer(k=32, n=8)
    run(SparseGPT(sparsity=0.5), w, calib)
    assert calls == ["SparseGPTRule"]


# ----------------------------------------------------------------------------- the model runs it
@pytest.fixture(scope="module")
def tiny():
    model = Model(TINY)
    params = model.init_params(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (8, 32)).astype(np.int32)
    return model, params, tokens, calibrate(model, params, tokens, progress=False)


@pytest.mark.parametrize("recipe", ["magnitude-50", "global-magnitude-40", "wanda-50", "sparsegpt-50",
                                    "wanda-2:4", pytest.param("sparsegpt-4:8", marks=pytest.mark.slow)])
def test_pruned_model_runs_through_linear(tiny, recipe):
    model, params, tokens, calib = tiny
    log = []
    sp = prune(params, recipe, calib, log=log)
    leaves = tree.flatten(sp)
    assert all(type(leaves[p]) is (NMArray if ":" in recipe else MaskedArray) for p in leaves if "/attn/" in p and p.endswith("/w"))
    assert type(leaves["embed/w"]) is not MaskedArray and len(log) == 14
    want = 0.4 if "40" in recipe else 0.5
    assert sparsity(sp)["sparsity"] == pytest.approx(want, abs=1e-9)
    toks = jnp.asarray(tokens[:2])
    a = model.forward(sp, toks)[0]
    b = model.forward(densify(sp), toks)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(a - model.forward(params, toks)[0]))) > 1e-3  # it did change the model


def test_masked_array_is_authoritative_and_resparsify(tiny):
    model, params, tokens, _ = tiny
    sp = prune(params, "magnitude-50")
    w = sp["layers"][0]["mlp"]["up"]["w"]
    poked = MaskedArray(jnp.ones_like(w.w), w.mask)  # values under the mask are ignored
    x = jnp.ones((1, TINY.dim), jnp.float32)
    np.testing.assert_allclose(np.asarray(nn.linear(x, poked)), np.asarray(x @ jnp.where(w.mask, 1.0, 0.0)), rtol=1e-6)
    dense = densify(sp)
    back = resparsify(jax.tree.map(lambda a: a * 2.0, dense), sp)
    m1, m2 = masks_of(sp), masks_of(back)
    assert set(m1) == set(m2) and all(np.array_equal(m1[p], m2[p]) for p in m1)


def test_composes_with_symmetric_quantization(tiny):
    from flashit_jax.quant import quantize

    model, params, tokens, calib = tiny
    q = quantize(densify(prune(params, "wanda-50", calib)), "w8")
    w = q["layers"][1]["mlp"]["down"]["w"].dequantize()
    assert float(jnp.mean((w == 0).astype(jnp.float32))) >= 0.5  # int8 symmetric keeps zeros at code 0


# ----------------------------------------------------------------------------- storage
def test_save_load_roundtrip(tiny, tmp_path):
    from flashit_jax.loading import load_model, save_model
    from flashit_jax.prune import online

    model, params, tokens, calib = tiny
    sp = prune(params, [(r"layers/0/.*/w", Wanda(sparsity=0.5)), (r"layers/1/mlp/.*/w", SparseGPT(nm=(2, 4))),
                        (r"layers/1/attn/[qkv]/w", Magnitude(sparsity=0.3, output="dense"))], calib)
    stats = online.activation_stats(model, sp, tokens[:2], pattern=r"layers/1/attn/o/w")
    sp = online.online_prune(sp, online.thresholds(stats, {"layers/1/attn/o/w": 0.4}))
    save_model(tmp_path / "m", TINY, sp, transforms=[{"transform": "prune"}])
    side = json.loads((tmp_path / "m" / "sparsity.json").read_text())
    assert side["layers/0/attn/q/w"]["type"] == "MaskedArray" and side["layers/0/attn/q/w"]["sparsity"] == 0.5
    assert side["layers/1/mlp/up/w"]["pattern"] == "2:4" and side["layers/1/attn/o/w"]["type"] == "ActSparse"
    assert "layers/1/attn/q/w" not in side  # output="dense": plain array with zeros
    back = load_model(str(tmp_path / "m"), "fp32")
    fa, fb = tree.flatten(sp), tree.flatten(back.params)
    for p in fa:
        assert type(fa[p]) is type(fb[p]), p
        for a, b in zip(jax.tree.leaves(fa[p]), jax.tree.leaves(fb[p])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    toks = jnp.asarray(tokens[:1])
    np.testing.assert_array_equal(np.asarray(model.forward(sp, toks)[0]), np.asarray(back.model.forward(back.params, toks)[0]))


def test_corrupt_sparsity_json_is_a_clear_error(tiny, tmp_path):
    from flashit_jax.loading import load_model, save_model

    model, params, _, _ = tiny
    save_model(tmp_path / "m", TINY, prune(params, "magnitude-2:4"))
    side = json.loads((tmp_path / "m" / "sparsity.json").read_text())
    side["layers/0/mlp/up/w"]["shape"] = [32, 96]
    (tmp_path / "m" / "sparsity.json").write_text(json.dumps(side))
    with pytest.raises(FlashitError, match="NMArray"):
        load_model(str(tmp_path / "m"))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_sparsity_outside_range(bad):
    for cls in (Magnitude, Wanda, SparseGPT):
        with pytest.raises(FlashitError, match=r"sparsity must be"):
            cls(sparsity=bad)


@pytest.mark.parametrize("recipe,msg", [("wanda-100", "sparsity must be in"), ("magnitude-5:4", "must not exceed"),
                                        ("sparsegpt-0:4", "positive"), ("wandaa-50", "unknown pruning recipe"),
                                        ("ffn-25", "structured recipe")])
def test_bad_recipes(tiny, recipe, msg):
    _, params, _, calib = tiny
    with pytest.raises(FlashitError, match=msg):
        prune(params, recipe, calib)


def test_other_bad_input(tiny):
    _, params, _, calib = tiny
    with pytest.raises(FlashitError, match="need calibration data"):
        prune(params, "wanda-50")
    with pytest.raises(FlashitError, match="not a multiple"):
        prune(params, [(r"layers/0/mlp/down/w", Magnitude(nm=(2, 5)))])
    with pytest.raises(FlashitError, match="embedding"):
        prune(params, [(r"embed/w", Magnitude(sparsity=0.5))])
    with pytest.raises(FlashitError, match="matches no parameter"):
        prune(params, [(r"nothing/w", Magnitude(sparsity=0.5))])
    with pytest.raises(FlashitError, match="already a NMArray"):
        prune(prune(params, "magnitude-2:4"), "magnitude-50")
    with pytest.raises(FlashitError, match="global magnitude"):
        Magnitude(nm=(2, 4), scope="global")
