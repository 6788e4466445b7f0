"""Pieces of the training stack: config parsing, data order, QAT, students, sharding rules, top-k cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError
from flashit_jax import sharding as shd
from models import Model
from models.llama import PARAM_AXES, LlamaConfig
from train import qat
from train.config import from_dict, parse_args
from train.data import TokenRows

TINY = LlamaConfig(vocab_size=96, dim=16, n_layers=5, n_heads=4, n_kv_heads=2, ffn_dim=32)


# ----------------------------------------------------------------------------- config
def test_config_precedence_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 7\nlr: 1.0e-3\nprogress: false\n")
    cfg = parse_args(["--config", str(y), "--lr", "2e-3", "--seq-len", "64"])
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.progress) == (7, 2e-3, 64, False)
    assert parse_args(["--progress"]).progress is True
    with pytest.raises(FlashitError, match="unknown config fields"):
        from_dict({"stpes": 3})
    with pytest.raises(FlashitError, match="expected int"):
        parse_args(["--steps", "many"])
    with pytest.raises(FlashitError, match="not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_shipped_yaml_configs_parse():
    for name in ("distill_shakespeare.yaml", "finetune_qat4.yaml"):
        parse_args(["--config", name])


# ----------------------------------------------------------------------------- data order
def _rows(n=10, seed=3):
    from flashit_jax.data import pack

    docs = [list(range(1, 30 + i)) for i in range(n)]
    return TokenRows(pack(docs, 16, seed=0, eos_id=0), seed, "fp")


def test_data_order_is_a_function_of_seed_and_step():
    r = _rows()
    n = r.n_rows
    a = np.concatenate([r.row_ids(s, 4) for s in range(2 * n // 4)])
    b = np.concatenate([_rows().row_ids(s, 4) for s in range(2 * n // 4)])
    np.testing.assert_array_equal(a, b)  # fresh object, same order
    assert sorted(a[:n]) == list(range(n))  # each epoch visits every row once
    assert sorted(a[n: 2 * n]) == list(range(n))
    assert not np.array_equal(a[:n], a[n: 2 * n])  # reshuffled per epoch
    np.testing.assert_array_equal(r.row_ids(5, 4), r.stream_ids(20, 24))
    assert not np.array_equal(_rows(seed=4).row_ids(0, n), r.row_ids(0, n))
    batch = r.rows(r.row_ids(0, 2))
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])


def test_empty_corpus_is_an_error(tmp_path):
    from train.data import load_rows

    p = tmp_path / "empty.jsonl"
    p.write_text('{"text": "   "}\n')
    with pytest.raises(FlashitError, match="no non-empty documents"):
        load_rows(str(p), "train", object(), 64, 0)


# ----------------------------------------------------------------------------- QAT
@pytest.mark.parametrize("sym", [True, False])
def test_fake_quant_grid_error_and_straight_through(sym):
    w = jax.random.normal(jax.random.key(0), (64, 8), jnp.float32)
    q = qat.FakeQuant(bits=3, group=16, symmetric=sym)
    d = np.asarray(qat.quantize_dequantize(w, q)).reshape(4, 16, 8)
    x = np.asarray(w).reshape(4, 16, 8)
    for g in range(4):
        for c in range(8):
            levels = np.unique(np.round(d[g, :, c], 6))
            assert len(levels) <= 2**3
            if sym:
                scale = np.abs(x[g, :, c]).max() / 3
            else:
                scale = (x[g, :, c].max() - x[g, :, c].min()) / 7
            assert np.abs(d[g, :, c] - x[g, :, c]).max() <= scale / 2 + 1e-6  # RTN: half a step at most
    # idempotent: quantized weights are on the grid
    np.testing.assert_allclose(qat.quantize_dequantize(jnp.asarray(d.reshape(64, 8)), q), d.reshape(64, 8), atol=1e-6)
    # forward is the quantized weight, gradient passes straight through
    np.testing.assert_array_equal(np.asarray(qat.fake_quant(w, q)), d.reshape(64, 8))
    g = jax.grad(lambda w: jnp.sum(qat.fake_quant(w, q) * jnp.arange(8, dtype=jnp.float32)))(w)
    np.testing.assert_array_equal(np.asarray(g), np.broadcast_to(np.arange(8, dtype=np.float32), (64, 8)))


def test_qat_rules_pick_weights():
    params = Model(TINY).init_params(jax.random.key(0))
    out = qat.apply_quantized(params, [(r"layers/\d+/mlp/\w+/w", qat.FakeQuant(4, 16))])
    assert not np.array_equal(out["layers"][0]["mlp"]["up"]["w"], params["layers"][0]["mlp"]["up"]["w"])
    np.testing.assert_array_equal(out["layers"][0]["attn"]["q"]["w"], params["layers"][0]["attn"]["q"]["w"])
    with pytest.raises(FlashitError, match="does not divide"):
        qat.quantize_dequantize(jnp.ones((10, 4)), qat.FakeQuant(4, 16))


# ----------------------------------------------------------------------------- students
def test_student_from_teacher_layers_and_specs(tmp_path):
    from train.student import build_student

    model = Model(TINY)
    params = model.init_params(jax.random.key(0))
    s = build_student("layers=0,2,4", model, params)
    assert s.model.config.n_layers == 3 and s.teacher_layers == (0, 2, 4)
    assert sorted(s.params["layers"]) == [0, 1, 2]
    assert s.params["layers"][1]["attn"]["q"]["w"] is params["layers"][2]["attn"]["q"]["w"]
    assert s.params["embed"]["w"] is params["embed"]["w"]
    logits, _, _ = s.model.forward(s.params, jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, TINY.vocab_size)
    for bad, msg in (("layers=0,9", "out of range"), ("layers=1,1", "repeat"), ("layers=a", "integers")):
        with pytest.raises(FlashitError, match=msg):
            build_student(bad, model, params)
    y = tmp_path / "narrow.yaml"
    y.write_text("config: {n_layers: 2, dim: 8, n_heads: 2, n_kv_heads: 1, ffn_dim: 16, head_dim: 4}\n")
    s = build_student(str(y), model, params)
    assert (s.model.config.n_layers, s.model.config.dim) == (2, 8)
    y.write_text("config: {vocab_size: 50}\n")
    with pytest.raises(FlashitError, match="vocabulary"):
        build_student(str(y), model, params)


def test_layer_map():
    from train.distill import layer_map

    assert layer_map((0, 6, 12, 18, 24, 29), 6, 30) == (5, 11, 17, 23, 28, 29)
    assert layer_map(None, 3, 12) == (3, 7, 11)


# ----------------------------------------------------------------------------- sharding rules
def test_rules_from_family_and_replication_defaults():
    mesh = shd.make_mesh()  # every device on `data`
    params = Model(TINY).init_params(jax.random.key(0))
    assert shd.family_axes(Model(TINY)) == PARAM_AXES
    sh = shd.param_shardings(params, mesh, PARAM_AXES)
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree.leaves(sh))
    assert shd.axes_of("layers/3/mlp/up/w", 2, PARAM_AXES) == ("embed", "mlp")
    assert shd.axes_of("something/else", 2, PARAM_AXES) == (None, None)
    assert shd.axes_of("layers/0/attn/q/w", 3, PARAM_AXES) == (None, None, None)  # rank mismatch: replicate


def test_logical_to_spec_on_abstract_mesh():
    mesh = jax.sharding.AbstractMesh((2, 2, 2, 1), shd.MESH_AXES)  # rules need only the axis sizes
    P = jax.sharding.PartitionSpec
    assert shd.logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("vocab", "embed"), mesh, shape=(9, 4)) == P(None, "fsdp")  # 9 % 2: replicated
    assert shd.logical_to_spec(("mlp", "mlp"), mesh) == P("tensor")  # a mesh axis at most once
    assert shd.logical_to_spec(("batch", "length"), mesh) == P(("data", "fsdp"))  # expert axis has size 1
    assert shd.logical_to_spec(("norm",), mesh) == P()


def test_make_mesh_errors():
    n = len(jax.devices())
    with pytest.raises(FlashitError, match="at most one"):
        shd.make_mesh(-1, -1)
    with pytest.raises(FlashitError, match="needs"):
        shd.make_mesh(n + 1, 1)


# ----------------------------------------------------------------------------- top-k cache
def test_topk_cache_round_trip_resume_and_mismatch(tmp_path):
    from train.topk_cache import TopKCache

    rng = np.random.default_rng(0)
    vals = rng.normal(size=(6, 5, 3)).astype(np.float32)
    idx = rng.integers(0, 1000, (6, 5, 3)).astype(np.int32)
    meta = {"teacher": "t", "data_fingerprint": "abc"}
    c = TopKCache.open_or_create(tmp_path / "c", n_rows=6, seq_len=5, k=3, meta=meta, rows_per_chunk=4)
    np.testing.assert_array_equal(c.missing_rows(), np.arange(6))
    c.write(np.array([4, 1]), vals[[4, 1]], idx[[4, 1]])
    c2 = TopKCache.open_or_create(tmp_path / "c", n_rows=6, seq_len=5, k=3, meta=meta)  # reopen from disk
    np.testing.assert_array_equal(c2.missing_rows(), [0, 2, 3, 5])
    c2.write(np.array([0, 2, 3, 5]), vals[[0, 2, 3, 5]], idx[[0, 2, 3, 5]])
    v, i = c2.read(np.array([5, 1, 4, 0, 2, 3]))
    np.testing.assert_array_equal(v, vals[[5, 1, 4, 0, 2, 3]])
    np.testing.assert_array_equal(i, idx[[5, 1, 4, 0, 2, 3]])
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*"))
    with pytest.raises(FlashitError, match="other settings"):
        TopKCache.open_or_create(tmp_path / "c", n_rows=6, seq_len=5, k=4, meta=meta)
    with pytest.raises(FlashitError, match="other settings"):
        TopKCache.open_or_create(tmp_path / "c", n_rows=6, seq_len=5, k=3, meta={**meta, "teacher": "u"})
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*")) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("keep")
    with pytest.raises(FlashitError, match="not a top-k cache"):
        TopKCache.open_or_create(tmp_path / "other", n_rows=6, seq_len=5, k=3, meta=meta)
    bf = TopKCache.open_or_create(tmp_path / "bf", n_rows=2, seq_len=5, k=3, meta=meta, dtype="bfloat16")
    bf.write(np.array([0, 1]), vals[:2], idx[:2])
    v, _ = bf.read(np.array([0, 1]))
    np.testing.assert_allclose(v, vals[:2], rtol=2**-8)  # bf16: 8 bits of mantissa


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_projection_forward_gives_the_unfused_loss_and_gradients(qkv_bias):
    """The training forward in the fused q|k|v, gate|up layout: same loss and gradients (fp32), and
    the gradients keep the unfused parameter names."""
    from train.step import Objective, make_token_loss

    c = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, qkv_bias=qkv_bias)
    model = Model(c)
    params = model.init_params(jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    batch = {"tokens": toks, "targets": jnp.roll(toks, -1, axis=1),
             "positions": jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12)),
             "segment_ids": jnp.ones((2, 12), jnp.int32)}
    out = {}
    for fuse in (False, True):
        loss = make_token_loss(Objective("ce"), model, compute_dtype=jnp.float32, attn_impl="xla",
                               fuse_projections=fuse)

        def f(p):
            tl, _ = loss({"model": p}, None, batch, jax.random.key(1))
            return jnp.mean(tl)

        with jax.default_matmul_precision("highest"):
            out[fuse] = jax.value_and_grad(f)(params)
        # the traced loss really runs the fused layout (the weights are concatenated inside it)
        cats = [e for e in jax.make_jaxpr(f)(params).jaxpr.eqns
                if e.primitive.name == "concatenate" and e.outvars[0].aval.ndim == 2]  # rope's are 4-D
        assert len(cats) == (2 * c.n_layers if fuse else 0), len(cats)
    (l0, g0), (l1, g1) = out[False], out[True]
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # and it does fuse: the traced forward has one q|k|v and one gate|up product per layer
    from train.step import _fused_for_training
    fused = _fused_for_training(model, params, ())
    assert set(fused["layers"][0]["attn"]) == {"qkv", "o"} and set(fused["layers"][0]["mlp"]) == {"gate_up", "down"}
    assert _fused_for_training(model, params, ("inputs",)) is params


def test_train_bench_rejects_unknown_sections(capsys):
    from train import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--only", "ours,oursunfused"])
    assert e.value.code == 2 and "unknown sections ['oursunfused']" in capsys.readouterr().err
