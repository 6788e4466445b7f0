"""Quantization methods against their defining properties, on synthetic layers and a tiny Llama."""
import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, nn, tree
from flashit_jax.quant import (AWQ, GPTQ, RTN, QArray, SmoothQuant, calibrate, named_recipe, obs, quantize,
                               size_bytes)
from flashit_jax.quant.gptq import gptq_quantize
from flashit_jax.quant.rtn import quantize_kn
from flashit_jax.quant.smooth import apply_smoothing
from models import Model
from models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, tie_embeddings=True)


def _correlated_inputs(t, k, seed=0, outliers=()):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.normal(size=(t, k)) @ a * rng.uniform(0.3, 2.0, k)
    for c in outliers:
        x[:, c] *= 40.0
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, False), (4, 64, True), (8, None, True),
                                            (2, 16, False)])
def test_rtn_error_bound(bits, group, sym):
    w = jnp.asarray(np.random.default_rng(bits).normal(size=(128, 48)) * 0.05, jnp.float32)
    g = group or 128
    q = quantize_kn(w, bits=bits, group_size=g, symmetric=sym, axis=0, shape=w.shape, dtype=jnp.float32,
                    scale_dtype="float32")
    s = np.repeat(np.asarray(q.scales), g, axis=0)
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    assert np.all(err <= 0.5 * s * (1 + 1e-5) + 1e-7)  # half a step, everywhere
    codes = np.asarray(jnp.round((q.dequantize() - (0 if sym else np.repeat(np.asarray(q.zeros), g, 0))) / s))
    lim = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert codes.min() >= lim[0] and codes.max() <= lim[1]


def test_rtn_per_tensor_and_fp16_scales():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
    q = quantize_kn(w, bits=8, group_size=64, symmetric=True, axis=0, shape=w.shape, dtype=jnp.float32,
                    per_tensor=True)
    assert q.scales.shape == (1, 1)
    assert float(jnp.max(jnp.abs(q.dequantize() - w))) <= 0.5 * float(q.scales[0, 0]) * 1.001
    q16 = quantize_kn(w, bits=4, group_size=32, symmetric=False, axis=0, shape=w.shape, dtype=jnp.float32)
    assert q16.scales.dtype == jnp.float16 and q16.zeros.dtype == jnp.float16


def test_q4_1_and_q8_0_blocks_come_back_exactly():
    """llama.cpp's Q4_1 (fp16 d and m, value = d*q + m, groups of 32) and Q8_0 (fp16 d, value = d*q)
    dequantized by the gguf package are fixed points of w4g32-asym and int8 g32 RTN."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(64, 256)) * 0.03).astype(np.float32)  # [out, in] rows as GGUF stores them
    for qtype, bits, sym in [(gguf.GGMLQuantizationType.Q4_1, 4, False), (gguf.GGMLQuantizationType.Q8_0, 8, True)]:
        deq = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)
        w_kn = jnp.asarray(deq.T)  # ours: [in, out], groups along in
        q = quantize_kn(w_kn, bits=bits, group_size=32, symmetric=sym, axis=0, shape=w_kn.shape, dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(q.dequantize()), deq.T)


# ----------------------------------------------------------------------------- OBS / GPTQ
@dataclasses.dataclass(frozen=True)
class _KeepRule:
    period = None

    def round(self, w, pos, j, ctx):
        return w, jnp.zeros(w.shape, jnp.int32)


@dataclasses.dataclass(frozen=True)
class _PruneHalfRule:
    """SparseGPT-style: per block of `period` columns, zero the half with the smallest w^2 / [H^-1]_jj."""

    period: int = 16

    def refresh(self, w_cols, hinv_diag, start):
        score = w_cols**2 / hinv_diag[None, :]
        thresh = jnp.median(score)
        return score <= thresh

    def round(self, w, pos, j, ctx):
        keep = ~ctx[:, pos % self.period]
        return jnp.where(keep, w, 0.0), keep.astype(jnp.int32)


def test_obs_core_identity_and_pruning_rule():
    x = _correlated_inputs(1024, 64)
    h = jnp.asarray(x.T @ x)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(32, 64)), jnp.float32)
    sol = obs.solve(w, h, _KeepRule())
    np.testing.assert_allclose(np.asarray(sol.q), np.asarray(w), atol=1e-5)
    assert float(sol.loss) < 1e-8
    # the same core prunes: exactly half the weights of each block go, with less output error than magnitude
    sol = obs.solve(w, h, _PruneHalfRule(), block_size=32)
    q = np.asarray(sol.q)
    assert abs((q == 0).mean() - 0.5) < 0.02
    mag = np.asarray(w) * (np.abs(np.asarray(w)) > np.median(np.abs(np.asarray(w))))
    assert obs.output_error(w, q, h) < 0.7 * obs.output_error(w, mag, h)


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (3, True)])
def test_gptq_beats_rtn_on_calibration_outputs(bits, act_order):
    k, n = 128, 64
    x = _correlated_inputs(2048, k, seed=bits)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(k, n)) * 0.05, jnp.float32)
    h = jnp.asarray(x.T @ x)
    kw = dict(bits=bits, group_size=32, symmetric=False, axis=0, shape=(k, n), dtype=jnp.float32)
    q, sol = gptq_quantize(w, h, act_order=act_order, **kw)
    r = quantize_kn(w, **kw)
    err = lambda qa: float(np.linalg.norm(x @ (np.asarray(w) - np.asarray(qa.dequantize()))))  # noqa: E731
    assert err(q) < 0.85 * err(r)
    np.testing.assert_array_equal(np.asarray(sol.q.T), np.asarray(q.dequantize()))  # the solver's grid = stored


# ----------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny():
    model = Model(TINY)
    params = model.init_params(jax.random.key(0))
    flat = tree.flatten(params)
    rng = np.random.default_rng(0)
    # outlier input channels, as real LLMs have: a few norm channels 20x larger
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


@pytest.mark.parametrize("method", [SmoothQuant(alpha=0.5), AWQ(bits=4, group_size=32)])
def test_smoothing_leaves_float_output_unchanged(tiny, method):
    model, params, calib, tokens = tiny
    flat = dict(tree.flatten(params))
    assign = {p: method for p in flat if p.startswith("layers/") and p.endswith("/w")}
    log = []
    new_calib = apply_smoothing(flat, assign, calib, n_layers=TINY.n_layers, head_dim=TINY.head_dim,
                                norm_offset=0.0, log=log)
    assert len(log) == 4 * TINY.n_layers  # qkv, o (through v, grouped heads), gate/up, down (through up)
    changed = [p for p in flat if not np.array_equal(np.asarray(flat[p]), np.asarray(tree.flatten(params)[p]))]
    assert any("norm" in p for p in changed) and any("attn/v/w" in p for p in changed)
    np.testing.assert_allclose(np.asarray(_logits(model, tree.unflatten(flat), tokens)),
                               np.asarray(_logits(model, params, tokens)), rtol=2e-4, atol=2e-4)
    # the statistics follow the fold: x / s
    assert new_calib.stats["layers/0/attn/q"] is not calib.stats["layers/0/attn/q"]


def _err(model, params, qparams, tokens):
    ref = _logits(model, params, tokens)
    return float(jnp.linalg.norm(_logits(model, qparams, tokens) - ref) / jnp.linalg.norm(ref))


def test_smoothquant_beats_naive_w8a8(tiny):
    model, params, calib, tokens = tiny
    naive = _err(model, params, quantize(params, "w8a8"), tokens)
    smooth = _err(model, params, quantize(params, "w8a8-smoothquant", calib), tokens)
    assert smooth < naive


def test_awq_beats_rtn_at_3_bits(tiny):
    model, params, calib, tokens = tiny
    rtn_err = _err(model, params, quantize(params, "w3g32"), tokens)
    awq_err = _err(model, params, quantize(params, "w3g32-awq", calib), tokens)
    assert awq_err < rtn_err


def test_named_recipes_and_sizes(tiny):
    model, params, calib, tokens = tiny
    q = quantize(params, "w4g32+emb8")
    flat = tree.flatten(q)
    assert isinstance(flat["embed/w"], QArray) and flat["embed/w"].axis == 1
    assert isinstance(flat["layers/1/mlp/down/w"], QArray) and flat["layers/1/mlp/down/w"].bits == 4
    assert not isinstance(flat["layers/1/mlp_norm/scale"], QArray)
    assert size_bytes(q) < size_bytes(params) / 2.5  # 4-bit codes + fp16 scale and zero per 32, vs bf16
    assert _err(model, params, quantize(params, "w8+emb8"), tokens) < _err(model, params, q, tokens) / 4
    assert [m for _, m in named_recipe("w4g64-gptq")] == [GPTQ(bits=4, group_size=64, symmetric=False)]
    assert named_recipe("w8")[0][1] == RTN(bits=8, group_size=None, symmetric=True)


def test_recipe_errors(tiny):
    model, params, calib, tokens = tiny
    with pytest.raises(FlashitError, match="unknown recipe"):
        quantize(params, "w5g7-magic")
    with pytest.raises(FlashitError, match="group size 48 does not divide"):
        quantize(params, "w4g48")
    with pytest.raises(FlashitError, match="need calibration data"):
        quantize(params, "w4g32-gptq")
    with pytest.raises(FlashitError, match="only matrices"):
        quantize(params, [(r".*norm/scale", RTN())])
    with pytest.raises(FlashitError, match="already quantized"):
        quantize(quantize(params, "w8"), "w8")
    with pytest.raises(FlashitError, match="matches no parameter"):
        quantize(params, [(r"nothing/here", RTN())])


def test_save_load_roundtrip(tmp_path, tiny):
    from flashit_jax.loading import load_model, save_model

    model, params, calib, tokens = tiny
    q = quantize(params, "w4g32-gptq+emb8", calib)
    save_model(tmp_path, TINY, q, transforms=[{"transform": "quantize", "recipe": "w4g32-gptq+emb8"}])
    meta = json.loads((tmp_path / "quant.json").read_text())
    assert meta["layers/0/attn/q/w"]["bits"] == 4 and meta["embed/w"]["axis"] == 1
    loaded = load_model(str(tmp_path))
    assert isinstance(tree.flatten(loaded.params)["layers/0/attn/q/w"], QArray)
    np.testing.assert_array_equal(np.asarray(_logits(model, loaded.params, tokens)),
                                  np.asarray(_logits(model, q, tokens)))
    assert loaded.transforms[-1]["recipe"] == "w4g32-gptq+emb8"
    # a fresh process that never imported flashit_jax.quant reads it (quant.json triggers the import)
    code = ("from flashit_jax.loading import load_model; from flashit_jax import tree; "
            f"p = load_model({str(tmp_path)!r}, 'bf16').params; w = tree.flatten(p)['layers/0/mlp/up/w']; "
            "print(type(w).__name__, w.dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["QArray", "bfloat16"]


def test_wrong_shape_in_file_is_a_clear_error(tmp_path, tiny):
    from flashit_jax.loading import load_model, save_model

    model, params, calib, tokens = tiny
    save_model(tmp_path, TINY, quantize(params, "w8"))
    meta = json.loads((tmp_path / "quant.json").read_text())
    meta["layers/0/attn/q/w"]["shape"] = [64, 32]
    (tmp_path / "quant.json").write_text(json.dumps(meta))
    with pytest.raises(FlashitError, match="layers/0/attn/q/w|qvalues"):
        load_model(str(tmp_path))


# ----------------------------------------------------------------------------- int8 KV cache
def test_int8_kv_cache():
    from flashit_jax.generate import generate

    model = Model(TINY)
    params = model.init_params(jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 32)), jnp.int32)
    step = jnp.asarray([[3], [7]], jnp.int32)
    full = _logits(model, params, jnp.concatenate([tokens, step], axis=1))
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    errs = {}
    for dtype in (jnp.float32, "int8"):
        cache = model.init_cache(2, 64, dtype)
        prefill, cache, _ = model.forward(params, tokens, cache=cache)
        one, cache, _ = model.forward(params, step, cache=cache)
        assert int(cache.lengths[0]) == 33
        errs[dtype] = (rel(prefill, full[:, :-1]), rel(one[:, 0], full[:, -1]))
    assert max(errs[jnp.float32]) < 1e-5  # the cached path itself is exact
    assert 0 < max(errs["int8"]) < 1e-2  # int8 keys/values: small, nonzero error
    cache = model.init_cache(2, 64, "int8")
    assert isinstance(cache, nn.Int8KVCache) and cache.k[0].dtype == jnp.int8
    k = jax.random.normal(jax.random.key(2), (2, 5, TINY.n_kv_heads, TINY.head_dim)) * 3
    k_all, _, entry = cache.update_layer(0, k, k)
    half_step = jnp.max(jnp.abs(k), axis=-1, keepdims=True) / 127 / 2
    assert bool(jnp.all(jnp.abs(k_all[:, :5] - k) <= half_step * 1.01))
    res8 = generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=4, cache_dtype="int8")
    res32 = generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=4, cache_dtype=jnp.float32)
    assert res8.tokens.shape == (2, 4) and (res8.tokens == res32.tokens).mean() >= 0.75


def test_quantize_cli(tmp_path, tiny, capsys):
    from eval.quantize import main
    from flashit_jax.loading import load_model, save_model

    model, params, calib, tokens = tiny
    save_model(tmp_path / "base", TINY, params)
    main(["--model", str(tmp_path / "base"), "--recipe", "w4g32+emb8", "--out", str(tmp_path / "q")])
    loaded = load_model(str(tmp_path / "q"))
    assert isinstance(tree.flatten(loaded.params)["embed/w"], QArray)
    assert json.loads((tmp_path / "q" / "transforms.json").read_text())[-1]["recipe"] == "w4g32+emb8"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "base"), "--recipe", "w4g32-gptq", "--out", str(tmp_path / "g")])
    assert e.value.code == 2 and "need calibration data" in capsys.readouterr().err


# the in-kernel split sum is opt-in (slower on GPUs): its cases in the slow set (16 + 5 s on 2 cores)
@pytest.mark.parametrize("fixup", ["0", pytest.param("1", marks=pytest.mark.slow)])
@pytest.mark.parametrize("recipe,kind", [("w8+emb8", ("i8", True)), ("w4g32-asym", ("u4x2", False))])
def test_decode_step_through_the_gemv_route(tiny, recipe, kind, fixup, monkeypatch):
    """`w8+emb8` (i8, one scale per column, the tied table too) and W4 groups of 32 with zeros in a 1-token
    decode step: the decode GEMV route (interpreted) gives the logits of dequantize-then-dot, with the K
    splits summed by XLA or in the kernel (FLASHIT_JAX_GEMV_FIXUP)."""
    from flashit_jax.nn.qarray import matmul_impl

    monkeypatch.setenv("FLASHIT_JAX_GEMV_FIXUP", fixup)

    model, params = tiny[0], tiny[1]
    q = quantize(params, named_recipe(recipe))
    kinds = {(a.packing, a.zeros is None) for a in jax.tree.leaves(
        q, is_leaf=lambda a: isinstance(a, QArray)) if isinstance(a, QArray)}
    assert kinds == {kind}
    cache = model.init_cache(1, 8, jnp.float32, params=q)
    _, cache, _ = model.forward(q, jnp.array([[5, 17, 100]]), cache=cache)
    with matmul_impl("xla"):
        want, _, _ = model.forward(q, jnp.array([[42]]), cache=cache)
    with matmul_impl("interpret-gemv"):
        got, _, _ = model.forward(q, jnp.array([[42]]), cache=cache)
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_generate_compiles_per_matmul_impl(tiny):
    """`generate` keeps one program per quantized-matmul implementation: a RECIPE@xla row of a benchmark
    must not re-run the RECIPE row's program (it did until 2026-12-05: first `generate`'s executable cache,
    then jit's trace cache ignored the setting), and the programs' tokens agree."""
    from flashit_jax import generate as gen
    from flashit_jax.nn.qarray import matmul_impl

    model, params = tiny[0], tiny[1]
    q = quantize(params, named_recipe("w8+emb8"))
    out, programs = {}, {}
    for impl in ("xla", "interpret", "xla"):  # interpret: the qmatmul kernel in Pallas' interpreter
        before = set(gen._EXECUTABLES)
        with matmul_impl(impl):
            out.setdefault(impl, []).append(gen.generate(model, q, [[5, 17, 100]], max_new_tokens=3,
                                                         cache_dtype=jnp.float32).tokens)
        new = [k for k in gen._EXECUTABLES if k not in before]
        out[impl].append(len(new))
        programs.setdefault(impl, [gen._EXECUTABLES[k].as_text() for k in new])
    assert out["interpret"][1] == 2  # after the xla run: its own prefill and decode
    assert out["xla"][3] == 0  # the same setting again: cached
    # and they are other programs, not the xla row's traced again under another key
    assert all(a != b for a, b in zip(programs["xla"], programs["interpret"]))
    np.testing.assert_array_equal(out["xla"][0], out["interpret"][0])


def test_quant_speed_variant_syntax():
    """eval.quant_speed rows: RECIPE[@xla|@pallas][:fixup|:nofixup|:rope ...]; anything else is refused by name."""
    from eval.quant_speed import main, parse_variant

    assert parse_variant("w8+emb8@xla:fixup") == ("w8+emb8", "xla", {"FLASHIT_JAX_GEMV_FIXUP": "1"})
    assert parse_variant("bf16:nofixup:rope") == ("bf16", None, {"FLASHIT_JAX_GEMV_FIXUP": "0",
                                                                  "FLASHIT_JAX_ROPE_KERNEL": "1"})
    assert parse_variant("w4g128+emb8") == ("w4g128+emb8", None, {})
    for bad, what in (("w8@cuda", "@cuda"), ("w8:fast", ":fast")):
        with pytest.raises(ValueError, match=what):
            parse_variant(bad)
        with pytest.raises(SystemExit):
            main(["--variants", f"bf16,{bad}"])
