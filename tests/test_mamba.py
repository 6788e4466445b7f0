"""Mamba: HF parity, recurrent decoding == the parallel pass, right-padded prefill, loading."""
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, have

from flashit_jax import FlashitError
from flashit_jax.generate import generate
from flashit_jax.loading import load_model, save_model
from models import Model
from models.mamba import MambaConfig

PARITY = FIXTURES / "parity" / "mamba"
TINY = MambaConfig(vocab_size=64, dim=32, n_layers=2, d_state=8, d_conv=4, dt_rank=4, tie_embeddings=False)


def _logits(model):
    return jax.jit(lambda p, t: model.forward(p, t)[0])


def _cached(model):
    return jax.jit(lambda p, t, c, lens=None, at=None: model.forward(p, t, cache=c, seq_lengths=lens, logits_at=at)[:2])


@functools.lru_cache(maxsize=None)
def _params(config, seed=0):
    """Random params with Δ near 1 and perturbed A, D, so the state carries real information."""
    p = Model(config).init_params(jax.random.key(seed))
    key = jax.random.key(seed + 1)
    for i in p["layers"]:
        m = p["layers"][i]["mixer"]
        key, k1, k2 = jax.random.split(key, 3)
        m["dt_proj"]["b"] = m["dt_proj"]["b"] + 4.0
        m["A_log"] = m["A_log"] + 0.3 * jax.random.normal(k1, m["A_log"].shape)
        m["D"] = m["D"] + 0.3 * jax.random.normal(k2, m["D"].shape)
    return p


@pytest.mark.parity
def test_hf_parity(tmp_path):
    """Logits equal transformers' MambaForCausalLM in fp32 (live when torch is here, else the fixture)."""
    if have("torch") and have("transformers"):
        from parity_models import build, hf_logits

        model, ids = build("mamba")
        model.save_pretrained(tmp_path, safe_serialization=True)
        path, want = tmp_path, hf_logits(model, ids)
    else:
        e = np.load(PARITY / "expected.npz")
        path, ids, want = PARITY, e["ids"], e["logits"]
    loaded = load_model(str(path), "float32")
    assert isinstance(loaded.config, MambaConfig)
    logits, _, _ = loaded.model.forward(loaded.params, jnp.asarray(ids, jnp.int32))
    assert np.abs(np.asarray(logits) - want).max() <= 1e-4


def test_fixture_parity():
    """The stored fixture, always (also when the live test above ran against a fresh model)."""
    e = np.load(PARITY / "expected.npz")
    loaded = load_model(str(PARITY), "float32")
    logits, _, _ = loaded.model.forward(loaded.params, jnp.asarray(e["ids"], jnp.int32))
    assert np.abs(np.asarray(logits) - e["logits"]).max() <= 1e-4


def test_recurrent_decode_equals_parallel_forward():
    model = Model(TINY)
    params = _params(TINY)
    tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, TINY.vocab_size, jnp.int32)
    full = _logits(model)(params, tokens)
    cache = model.init_cache(2, 16, jnp.float32)
    step = _cached(model)
    logits, cache = step(params, tokens[:, :4], cache)  # prefill through the scan
    np.testing.assert_allclose(logits, full[:, :4], atol=1e-5, rtol=1e-5)
    for t in range(4, 11):  # then one recurrent step per token
        logits, cache = step(params, tokens[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [11, 11]


def test_right_padded_prefill_freezes_state():
    """Rows of different lengths in one padded prefill continue exactly like their own sequences."""
    model = Model(TINY)
    params = _params(TINY, seed=1)
    seqs = [jax.random.randint(jax.random.key(i), (n,), 0, TINY.vocab_size, jnp.int32) for i, n in ((5, 3), (6, 7))]
    nxt = jnp.array([[9], [17]], jnp.int32)
    padded = jnp.stack([jnp.pad(s, (0, 8 - s.shape[0]), constant_values=5) for s in seqs])
    lens = jnp.array([s.shape[0] for s in seqs], jnp.int32)
    cache = model.init_cache(2, 16, jnp.float32)
    step = _cached(model)
    last, cache = step(params, padded, cache, lens, lens - 1)
    after, cache = step(params, nxt, cache)
    assert cache.lengths.tolist() == [4, 8]
    fwd = _logits(model)
    for b, s in enumerate(seqs):
        own = fwd(params, jnp.concatenate([s, nxt[b]])[None])
        np.testing.assert_allclose(last[b, 0], own[0, s.shape[0] - 1], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(after[b, 0], own[0, -1], atol=1e-5, rtol=1e-5)


def test_generate_matches_greedy_recompute():
    """Each generated token is the argmax of the parallel pass over everything before it."""
    model = Model(TINY)
    params = _params(TINY, seed=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = generate(model, params, prompts, max_new_tokens=4, pad_multiple=8)
    fwd = _logits(model)
    for b, prompt in enumerate(prompts):
        seq = prompt + out.tokens[b].tolist()
        logits = fwd(params, jnp.asarray([seq], jnp.int32))
        greedy = jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)
        assert greedy.tolist() == out.tokens[b].tolist()


def test_collect_and_native_roundtrip(tmp_path):
    model = Model(TINY)
    params = _params(TINY, seed=3)
    tokens = jnp.arange(6, dtype=jnp.int32)[None]
    logits, _, aux = model.forward(params, tokens, collect=("inputs", "hidden"))
    assert len(aux["hidden"]) == TINY.n_layers
    assert set(aux["inputs"]) == {f"layers/{i}/mixer/{n}" for i in range(2)
                                  for n in ("in_x", "in_z", "x_proj", "dt_proj", "out_proj")} | {"lm_head"}
    save_model(tmp_path / "m", TINY, params)
    back = load_model(str(tmp_path / "m"), "float32")
    assert back.config == TINY
    again, _, _ = back.model.forward(back.params, tokens)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="conv width"):
        MambaConfig(vocab_size=8, dim=8, n_layers=1, d_conv=0)
    d = tmp_path / "bad"
    shutil.copytree(PARITY, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "conv_kernel": 0}))
    with pytest.raises(FlashitError, match="conv width"):
        load_model(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "state_size": 4}))
    with pytest.raises(FlashitError, match="A_log"):
        load_model(str(d))
    with pytest.raises(FlashitError, match="segment_ids"):
        Model(TINY).forward(_params(TINY), jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.zeros((1, 4), jnp.int32))
    cache = Model(TINY).init_cache(1, 8, jnp.float32)
    with pytest.raises(FlashitError, match="roll back"):
        cache.rollback(0)


def test_param_axes_cover_every_parameter():
    import re

    from flashit_jax import tree
    from models.mamba import PARAM_AXES

    shapes = jax.eval_shape(lambda: Model(TINY).init_params(jax.random.key(0)))
    for path, leaf in tree.flatten(shapes).items():
        axes = next((a for pat, a in PARAM_AXES if re.fullmatch(pat, path)), None)
        assert axes is not None and len(axes) == len(leaf.shape), path


@pytest.mark.slow  # 19 s on 2 cores (2026-12-06): the multi-head scan stays in tests/kernels/test_ssm_scan.py
def test_multihead_mixer_decode_and_attention_init():
    """The Mamba-2-layout mixer: recurrent steps equal its parallel pass; from_attention maps weights."""
    from models.mamba import MultiHeadConfig, from_attention, init_multihead, multihead_mixer

    c = MultiHeadConfig(dim=16, n_heads=4, n_groups=2, head_dim=8, d_state=8)
    k = jax.random.split(jax.random.key(0), 5)
    attn = {"q": {"w": jax.random.normal(k[0], (16, 32))}, "k": {"w": jax.random.normal(k[1], (16, 16))},
            "v": {"w": jax.random.normal(k[2], (16, 16))}, "o": {"w": jax.random.normal(k[3], (32, 16))}}
    p = from_attention(attn, c, k[4])
    assert p["C"]["w"] is attn["q"]["w"] and p["B"]["w"] is attn["k"]["w"] and p["out"]["w"] is attn["o"]["w"]
    with pytest.raises(FlashitError, match="from_attention"):
        from_attention({**attn, "k": {"w": attn["q"]["w"]}}, c, k[4])
    p = init_multihead(c, jax.random.key(1))
    h = jax.random.normal(jax.random.key(2), (2, 7, 16))
    full, _, _ = multihead_mixer(p, h, c)
    conv = jnp.zeros((2, c.d_conv - 1, c.conv_channels))
    ssm = jnp.zeros((2, 4, 8, 8))
    out, conv, ssm = multihead_mixer(p, h[:, :3], c, conv_prev=conv, ssm_prev=ssm)
    steps = [out]
    for t in range(3, 7):
        out, conv, ssm = multihead_mixer(p, h[:, t:t + 1], c, conv_prev=conv, ssm_prev=ssm)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
