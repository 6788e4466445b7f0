"""The hybrid family (Llama with attention layers converted to Mamba mixers) and its training path."""
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError, tree
from models import Model, hybrid
from models.llama import LlamaConfig
from models.mamba import multihead_mixer

CFG = LlamaConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48, tie_embeddings=True)


_PARAMS = {}


def _llama(cfg=CFG, seed=0):
    if (cfg, seed) not in _PARAMS:
        _PARAMS[cfg, seed] = Model(cfg).init_params(jax.random.key(seed))
    return jax.tree.map(lambda a: a, _PARAMS[cfg, seed])  # fresh containers, shared arrays


def _fwd(model):
    """jitted (params, tokens, cache=None) -> (logits, cache): eager dispatch is slow on a loaded CPU."""
    return jax.jit(lambda p, t, c=None: model.forward(p, t, cache=c)[:2])


def _linear_attention_limit(mp):
    """The mixer params with A = 0, Δ = 1, D = 0 (the conv is already the identity)."""
    mp = dict(mp)
    mp["A_log"] = jnp.full_like(mp["A_log"], -jnp.inf)  # A = -exp(-inf) = 0: no decay
    mp["dt"] = {"w": jnp.zeros_like(mp["dt"]["w"]), "b": jnp.full_like(mp["dt"]["b"], math.log(math.e - 1))}
    mp["D"] = jnp.zeros_like(mp["D"])
    return mp


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("scan_impl", ["ssd", "reference"])
def test_identity_limit_is_causal_linear_attention(qkv_bias, scan_impl):
    """A = 0, Δ = 1, D = 0, identity conv, no gate: y_t = W_O Σ_{s<=t} (q_t·k_s) v_s with the source layer's Q/K/V."""
    cfg = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, qkv_bias=qkv_bias)
    params = _llama(cfg)
    if qkv_bias:  # random biases, so that a dropped bias would show
        for i, n in enumerate("qkv"):
            b = params["layers"][1]["attn"][n]["b"]
            params["layers"][1]["attn"][n]["b"] = 0.3 * jax.random.normal(jax.random.key(10 + i), b.shape)
    hc, hp = hybrid.from_llama(cfg, params, [1], gate=False, mixer_norm=False, conv_act="identity")
    mp = _linear_attention_limit(hp["layers"][1]["mixer"])
    attn = params["layers"][1]["attn"]
    x = jax.random.normal(jax.random.key(1), (2, 9, cfg.dim), jnp.float32)
    y, _, _ = multihead_mixer(mp, x, hc.mixer, scan_impl=scan_impl)

    def proj(n):
        return x @ attn[n]["w"] + (attn[n]["b"] if qkv_bias else 0.0)

    hd, rep = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    q = proj("q").reshape(2, 9, cfg.n_heads, hd)
    k = jnp.repeat(proj("k").reshape(2, 9, cfg.n_kv_heads, hd), rep, axis=2)  # head h reads KV group h // rep
    v = jnp.repeat(proj("v").reshape(2, 9, cfg.n_kv_heads, hd), rep, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((9, 9)))
    want = jnp.einsum("bhts,bshd->bthd", scores, v).reshape(2, 9, -1) @ attn["o"]["w"]
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=2e-5 * scale, rtol=0)

    # the recurrent steps give the same outputs
    m = hc.mixer
    conv, ssm = jnp.zeros((2, m.d_conv - 1, m.conv_channels)), jnp.zeros((2, m.n_heads, m.head_dim, m.d_state))
    steps = []
    for t in range(9):
        out, conv, ssm = multihead_mixer(mp, x[:, t:t + 1], m, conv_prev=conv, ssm_prev=ssm)
        steps.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(want), atol=2e-5 * scale, rtol=0)


def test_conversion_keeps_the_llama_and_zero_layers_is_the_llama():
    params = _llama()
    hc, hp = hybrid.from_llama(CFG, params, [1, 3], key=jax.random.key(5))
    assert hc.mamba_layers == (1, 3) and hc.attn_layers == (0, 2)
    for i in (0, 2):
        assert hp["layers"][i] is params["layers"][i]
    for i in (1, 3):
        lp, mp = params["layers"][i], hp["layers"][i]["mixer"]
        assert hp["layers"][i]["mlp"] is lp["mlp"] and hp["layers"][i]["attn_norm"] is lp["attn_norm"]
        assert mp["x"]["w"] is lp["attn"]["v"]["w"] and mp["B"]["w"] is lp["attn"]["k"]["w"]
        assert mp["C"]["w"] is lp["attn"]["q"]["w"] and mp["out"]["w"] is lp["attn"]["o"]["w"]
        dt = jax.nn.softplus(mp["dt"]["b"])
        assert bool(jnp.all((dt > 0.99e-3) & (dt < 0.101))) and bool(jnp.all(mp["dt"]["w"] == 0))
        a = jnp.exp(mp["A_log"])
        assert bool(jnp.all((a >= 1) & (a <= 16)))
    assert hc.n_params == sum(x.size for x in jax.tree.leaves(hp))
    assert jax.tree.structure(Model(hc).init_params(jax.random.key(0))) == jax.tree.structure(hp)

    h0, p0 = hybrid.from_llama(CFG, params, [])
    toks = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    want, _ = _fwd(Model(CFG))(params, toks)
    got, _ = _fwd(Model(h0))(p0, toks)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_convert_layers():
    assert hybrid.convert_layers(30, 0.5) == tuple(range(1, 30, 2))
    assert hybrid.convert_layers(30, 1.0) == tuple(range(30))
    assert hybrid.convert_layers(30, 0.0) == ()
    assert hybrid.convert_layers(4, 0.25) == (3,)
    with pytest.raises(FlashitError, match="fraction"):
        hybrid.convert_layers(30, 1.5)


@pytest.mark.parametrize("layers", [(1, 3), pytest.param((0, 1, 2, 3), marks=pytest.mark.slow)])  # 32 s each
def test_recurrent_decoding_equals_parallel_forward(layers):
    hc, hp = hybrid.from_llama(CFG, _llama(), layers, key=jax.random.key(3))
    for i in hc.mamba_layers:  # make every mixer term matter: D, conv taps, input-dependent Δ
        mp = hp["layers"][i]["mixer"]
        k = jax.random.split(jax.random.key(100 + i), 3)
        mp["conv"]["kernel"] = 0.5 * jax.random.normal(k[0], mp["conv"]["kernel"].shape)
        mp["dt"]["w"] = 0.1 * jax.random.normal(k[1], mp["dt"]["w"].shape)
        mp["D"] = jax.random.normal(k[2], mp["D"].shape)
    m = Model(hc)
    fwd = _fwd(m)
    toks = jax.random.randint(jax.random.key(4), (2, 13), 0, CFG.vocab_size)
    full, _ = fwd(hp, toks)
    cache = m.init_cache(2, 32, jnp.float32, params=hp)
    assert len(cache.attn_k) == CFG.n_layers - len(layers) and len(cache.ssm) == len(layers)
    logits, cache = fwd(hp, toks[:, :5], cache)
    outs = [logits]
    for t in range(5, 13):
        logits, cache = fwd(hp, toks[:, t:t + 1], cache)
        outs.append(logits)
    assert cache.lengths.tolist() == [13, 13]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-5, rtol=2e-5)

    # right-padded batched prefill (rows of different lengths), then generate's greedy tokens
    from flashit_jax.generate import generate

    prompts = [np.asarray(toks[0, :7]).tolist(), np.asarray(toks[1, :4]).tolist()]
    res = generate(m, hp, prompts, max_new_tokens=5)
    for b, p in enumerate(prompts):  # each generated token is the argmax of a full (cache-free) forward
        seq = p + res.tokens[b].tolist()
        lg, _ = fwd(hp, jnp.asarray([seq], jnp.int32))
        assert jnp.argmax(lg[0, len(p) - 1:len(seq) - 1], axis=-1).tolist() == res.tokens[b].tolist()


def test_cache_memory_and_rollback():
    hc, hp = hybrid.from_llama(CFG, _llama(), [1, 3])
    cache = Model(hc).init_cache(1, 64, jnp.bfloat16)
    m = hc.mixer
    kv_slot = 2 * 2 * CFG.n_kv_heads * CFG.head_dim * 2  # k and v, 2 attention layers, bf16
    state = 2 * ((m.d_conv - 1) * m.conv_channels * 2 + m.n_heads * m.head_dim * m.d_state * 4)
    assert cache.nbytes_at(100) == 100 * kv_slot + state
    with pytest.raises(FlashitError, match="cannot roll back"):
        cache.rollback(3)
    h0, _ = hybrid.from_llama(CFG, _llama(), [])
    assert Model(h0).init_cache(2, 16, jnp.float32).rollback(3).lengths.tolist() == [3, 3]


def test_save_load_roundtrip(tmp_path):
    from flashit_jax.loading import load_model, save_model

    hc, hp = hybrid.from_llama(CFG, _llama(), [0, 2], d_conv=3, gate=False, conv_act="identity")
    save_model(tmp_path / "m", hc, hp, transforms=[{"transform": "hybrid"}])
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.config == hc and type(loaded.config) is hybrid.HybridConfig
    toks = jax.random.randint(jax.random.key(4), (1, 10), 0, CFG.vocab_size)
    a, _ = _fwd(Model(hc))(hp, toks)
    b, _ = _fwd(loaded.model)(loaded.params, toks)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_param_axes_cover_every_leaf():
    from models.hybrid import PARAM_AXES

    hc, hp = hybrid.from_llama(CFG, _llama(), [1])
    for path, leaf in tree.flatten(hp).items():
        axes = next((a for pat, a in PARAM_AXES if re.fullmatch(pat, path)), None)
        assert axes is not None and len(axes) == leaf.ndim, path


def test_bad_input():
    params = _llama()
    with pytest.raises(FlashitError, match="out of range"):
        hybrid.from_llama(CFG, params, [4])
    with pytest.raises(FlashitError, match="repeat"):
        hybrid.from_llama(CFG, params, [1, 1])
    with pytest.raises(FlashitError, match="conv_act"):
        hybrid.from_llama(CFG, params, [1], conv_act="relu")
    hc, hp = hybrid.from_llama(CFG, params, [1])
    with pytest.raises(FlashitError, match="converts a Llama"):
        hybrid.from_llama(hc, hp, [2])
    toks = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(FlashitError, match="segment_ids"):
        Model(hc).forward(hp, toks, segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(FlashitError, match="layer 1"):
        Model(hc).forward(params, toks)  # Llama params under a hybrid config
    with pytest.raises(ValueError, match="ssd"):
        from kernels.ssm_scan import selective_scan

        x = jnp.zeros((1, 4, 8))
        selective_scan(x, x, jnp.zeros((8, 2)), jnp.zeros((1, 4, 2)), jnp.zeros((1, 4, 2)), impl="ssd")


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny_lm import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "teacher")


def _args(teacher, out, *extra):
    return ["--teacher", str(teacher), "--data", "bundled", "--seq-len", "32", "--batch-size", "4", "--steps", "4",
            "--log-every", "1", "--eval-every", "0", "--eval-ctx", "32", "--eval-max-chunks", "1",
            "--progress", "false", "--compute-dtype", "fp32", "--warmup-steps", "0", "--lr", "1e-2",
            "--doc-masking", "false", "--out", str(out), *extra]


def _metrics(out):
    import json

    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 20-30 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_staged_distillation_align_then_kl(teacher, tmp_path):
    """Stage 1 trains only the mixers (everything else bit-exact) and its first loss is the definition;
    stage 2 loads the stage-1 model and trains end to end on the KL; both save loadable hybrids."""
    from flashit_jax.loading import load_model
    from train.distill import main
    from train.losses import token_layer_alignment

    t = load_model(str(teacher))
    s1 = tmp_path / "s1"
    main(_args(teacher, s1, "--student", "hybrid=50%", "--loss", "align", "--ckpt-every", "0",
               "--trainable", r"layers/\d+/mixer/.*"))
    m1 = load_model(str(s1 / "model"))
    assert m1.config.mamba_layers == (1, 3)
    hc, hp = hybrid.from_llama(t.config, t.params, (1, 3), key=jax.random.key(0))
    for path, leaf in tree.flatten(m1.params).items():
        if "/mixer/" not in path:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(tree.flatten(t.params)[path]), err_msg=path)
    changed = [p for p, v in tree.flatten(m1.params).items() if "/mixer/" in p
               and not np.array_equal(np.asarray(v), np.asarray(tree.flatten(hp)[p]))]
    assert changed
    recs = [r for r in _metrics(s1) if "loss" in r]
    assert recs[-1]["loss"] < recs[0]["loss"]

    # the first logged loss is token_layer_alignment on step 0's batch, averaged over the converted layers
    from train.data import load_rows
    from flashit_jax.loading import cache_dir

    rows = load_rows("bundled", "train", t.tokenizer, 32, 0, cache_dir() / "packed")
    batch = rows.rows(rows.row_ids(0, 4))
    toks = jnp.asarray(batch["tokens"])
    _, _, aux = t.model.forward(t.params, toks, collect=("hidden",))
    hid = aux["hidden"]
    outs = hybrid.layer_outputs(hp, {1: hid[0], 3: hid[2]}, config=hc)
    err = (token_layer_alignment(outs[1], hid[1], hid[0]) + token_layer_alignment(outs[3], hid[3], hid[2])) / 2
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    assert recs[0]["loss"] == pytest.approx(float(jnp.sum(err * mask) / jnp.sum(mask)), rel=1e-4)

    s2 = tmp_path / "s2"
    summ = main(_args(teacher, s2, "--student", str(s1 / "model"), "--loss", "fkl", "--temperature", "1",
                      "--ckpt-every", "0", "--final-eval-max-chunks", "1"))
    m2 = load_model(str(s2 / "model"))
    assert m2.config == m1.config and np.isfinite(summ["eval_ppl"])
    assert [r["transform"] for r in m2.transforms][-1] == "distill"


@pytest.mark.slow  # three training runs; the loop's resume is also covered by tests/test_train_resume.py
def test_checkpoints_resume(teacher, tmp_path):
    """A run that stopped after its step-2 checkpoint, started again, ends bit-identical to one that did not stop."""
    from train.distill import main

    args = ("--student", "hybrid=1,2", "--loss", "fkl", "--temperature", "1", "--ckpt-every", "2",
            "--async-checkpoints", "false")
    main(_args(teacher, tmp_path / "ref", *args))
    run = tmp_path / "run"
    main(_args(teacher, run, *args))
    shutil.rmtree(run / "ckpt" / "4")  # as if it had been killed between the checkpoints of steps 2 and 4
    shutil.rmtree(run / "model")
    s = main(_args(teacher, run, *args))
    assert s["resumed_from"] == 2
    assert (run / "model" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()
    assert [(r["step"], r["loss"]) for r in _metrics(run) if "loss" in r] == \
        [(r["step"], r["loss"]) for r in _metrics(tmp_path / "ref") if "loss" in r]


def test_training_bad_input(teacher, tmp_path, capsys):
    from train.distill import main

    with pytest.raises(SystemExit):  # user_errors: message and exit 2
        main(_args(teacher, tmp_path / "a", "--student", "hybrid=50%", "--doc-masking", "true"))
    assert "--doc-masking false" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    from flashit_jax.loading import load_model
    from train.student import build_student

    t = load_model(str(teacher))
    for spec, msg in (("hybrid=150%", "fraction"), ("hybrid=1,9", "out of range"), ("hybrid=x.y", "expected hybrid")):
        with pytest.raises(FlashitError, match=msg):
            build_student(spec, t.model, t.params)
    from train.step import Objective

    with pytest.raises(FlashitError, match="align"):
        Objective(loss="align")  # a student without converted layers has nothing to align
    from train.optim import trainable_mask

    with pytest.raises(FlashitError, match="trainable"):
        trainable_mask("layers/(")
