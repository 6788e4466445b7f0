"""train.distill / train.finetune end to end on a tiny teacher (in-process, one CPU device)."""
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from flashit_jax import FlashitError


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny_lm import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "teacher")


def _args(teacher, out, *extra):
    return ["--teacher", str(teacher), "--student", "layers=0,2", "--data", "bundled", "--seq-len", "32",
            "--batch-size", "4", "--steps", "3", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0",
            "--eval-ctx", "32", "--eval-max-chunks", "1", "--progress", "false", "--compute-dtype", "fp32",
            "--warmup-steps", "0", "--lr", "1e-2", "--out", str(out), *extra]


def _metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _tree_hash(d: Path):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_distill_saves_a_model_eval_perplexity_loads(teacher, tmp_path):
    from eval.perplexity import evaluate
    from flashit_jax.data import load_documents
    from flashit_jax.loading import load_model
    from train.distill import main

    s = main(_args(teacher, tmp_path / "run", "--loss", "mix", "--final-eval-max-chunks", "2"))
    loaded = load_model(str(tmp_path / "run" / "model"))
    assert loaded.config.n_layers == 2
    assert [t["transform"] for t in loaded.transforms] == ["random_init", "distill"]
    rec = loaded.transforms[-1]
    assert rec["loss"] == "mix" and rec["steps"] == 3 and rec["student"] == "layers=0,2"
    rep = evaluate(loaded.model, loaded.params, loaded.tokenizer, load_documents("bundled", "valid"), ctx=32,
                   max_chunks=2, progress=False)
    assert rep["ppl"] == pytest.approx(s["eval_ppl"], rel=1e-5)  # the saved model is the trained one
    m = _metrics(tmp_path / "run")
    train = [r for r in m if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5)
               for r in train)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_accumulation_equals_one_big_batch(teacher, tmp_path):
    from flashit_jax.loading import load_model
    from train.distill import main

    # lr 1e-3: Adam divides by sqrt(v), which turns fp32 rounding in near-zero gradients into
    # lr-sized differences; a smaller lr keeps the comparison about the step, not Adam's sign noise
    main(_args(teacher, tmp_path / "a1", "--loss", "soft", "--lr", "1e-3"))
    main(_args(teacher, tmp_path / "a2", "--loss", "soft", "--lr", "1e-3", "--accum-steps", "2"))
    p1, p2 = (jax.tree.leaves(load_model(str(tmp_path / d / "model")).params) for d in ("a1", "a2"))
    num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b)) ** 2)) for a, b in zip(p1, p2))
    den = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in p1)
    assert (num / den) ** 0.5 < 1e-6
    l1, l2 = _metrics(tmp_path / "a1"), _metrics(tmp_path / "a2")
    for r1, r2 in zip(l1, l2):
        if "loss" in r1:
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)


@pytest.mark.slow  # 20-100 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_topk_cache_run_matches_its_definition(teacher, tmp_path):
    """First-step top-k loss equals the soft-target loss restricted to the cached top-k logits."""
    import jax.numpy as jnp

    from flashit_jax.loading import load_model
    from train import losses as L
    from train.data import load_rows
    from train.distill import main
    from train.topk_cache import TopKCache

    main(_args(teacher, tmp_path / "tk", "--loss", "topk", "--topk", "5", "--temperature", "2", "--steps", "2"))
    t = load_model(str(teacher))
    rows = load_rows("bundled", "train", t.tokenizer, 32, 0)
    cache_dirs = list((tmp_path / "tk" / "topk").glob("meta.json"))
    assert cache_dirs
    meta = json.loads(cache_dirs[0].read_text())
    cache = TopKCache.open_or_create(tmp_path / "tk" / "topk", n_rows=meta["n_rows"], seq_len=32, k=5,
                                     meta={k: meta[k] for k in ("teacher", "data_fingerprint", "teacher_dtype",
                                                                "doc_masking")})
    ids = rows.row_ids(0, 4)
    b = rows.rows(ids)
    vals, idx = cache.read(ids)
    tl, _, _ = t.model.forward(t.params, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]),
                               segment_ids=jnp.asarray(b["segment_ids"]))
    ref_vals, ref_idx = jax.lax.top_k(tl, 5)
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idx, ref_idx)
    # the student at step 0 is layers 0, 2 of the teacher
    from train.student import from_teacher_layers

    sm, sp = from_teacher_layers(t.model, t.params, (0, 2))
    sl, _, _ = sm.forward(sp, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]),
                          segment_ids=jnp.asarray(b["segment_ids"]))
    want = L.topk_kl(sl, jnp.asarray(vals), jnp.asarray(idx), jnp.asarray(b["loss_mask"]), temperature=2.0)
    assert _metrics(tmp_path / "tk")[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    # a second run reuses the cache (no rebuild: files unchanged)
    before = _tree_hash(tmp_path / "tk" / "topk")
    main(_args(teacher, tmp_path / "tk2", "--loss", "topk", "--topk", "5", "--temperature", "2", "--steps", "2",
               "--topk-cache", str(tmp_path / "tk" / "topk")))
    assert _tree_hash(tmp_path / "tk" / "topk") == before


@pytest.mark.parametrize("attn", ["1", pytest.param("0", marks=pytest.mark.slow)])
def test_feature_distillation_trains_projections(teacher, tmp_path, attn):
    from train.distill import main

    main(_args(teacher, tmp_path / "f", "--loss", "feature", "--attention-weight", attn, "--feature-weight", "1",
               "--student", "layers=0,3"))
    m = [r for r in _metrics(tmp_path / "f") if "loss" in r]
    assert all(np.isfinite(r["hidden"]) for r in m)
    assert ("attention" in m[0]) == (attn == "1")
    for r in m:
        extra = r["hidden"] + (r["attention"] if attn == "1" else 0.0)
        assert r["loss"] == pytest.approx(r["kd"] + extra, rel=1e-5)


@pytest.mark.slow  # ~20 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_finetune_qat_saves_weights_on_the_grid(teacher, tmp_path):
    from flashit_jax.loading import load_model
    from train import qat
    from train.finetune import main

    main(["--model", str(teacher), "--data", "bundled", "--seq-len", "32", "--batch-size", "4", "--steps", "2",
          "--eval-every", "0", "--ckpt-every", "0", "--eval-ctx", "32", "--eval-max-chunks", "1", "--progress",
          "false", "--qat-bits", "4", "--qat-group", "16", "--out", str(tmp_path / "q")])
    m = load_model(str(tmp_path / "q" / "model"))
    assert m.transforms[-1]["qat"]["bits"] == 4
    w = m.params["layers"][1]["mlp"]["down"]["w"]
    np.testing.assert_allclose(qat.quantize_dequantize(w, qat.FakeQuant(4, 16)), w, atol=1e-6)
    orig = load_model(str(teacher)).params["layers"][1]["mlp"]["down"]["w"]
    assert not np.allclose(w, orig)


# ----------------------------------------------------------------------------- bad input
def test_vocab_mismatch_is_an_error(teacher, tmp_path):
    from train.distill import main

    y = tmp_path / "s.yaml"
    y.write_text("config: {vocab_size: 1000, n_layers: 1}\n")
    with pytest.raises(SystemExit) as e:
        main(_args(teacher, tmp_path / "v", "--student", str(y)))
    assert e.value.code == 2
    assert not (tmp_path / "v").exists()
    from train.distill import build_task
    from train.config import parse_args

    with pytest.raises(FlashitError, match="vocabulary"):
        build_task(parse_args(_args(teacher, tmp_path / "v", "--student", str(y))))


def test_other_config_in_run_dir_is_refused_and_nothing_overwritten(teacher, tmp_path, capsys):
    from train.distill import main

    out = tmp_path / "run"
    main(_args(teacher, out, "--steps", "2", "--ckpt-every", "1"))
    before = _tree_hash(out)
    with pytest.raises(SystemExit):
        main(_args(teacher, out, "--steps", "2", "--ckpt-every", "1", "--lr", "5e-3"))
    assert "another config" in capsys.readouterr().err
    assert _tree_hash(out) == before
    # a directory with checkpoints but no run record is not ours to write into
    (out / "run_config.json").unlink()
    before = _tree_hash(out)
    with pytest.raises(SystemExit):
        main(_args(teacher, out, "--steps", "2"))
    assert _tree_hash(out) == before


def test_empty_corpus_is_an_error_before_writing(teacher, tmp_path, capsys):
    from train.distill import main

    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(SystemExit):
        main(_args(teacher, tmp_path / "e", "--data", str(data)))
    assert "no non-empty documents" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_cudnn_without_doc_masking_flag_is_an_error(teacher, tmp_path, capsys):
    from train.distill import main

    with pytest.raises(SystemExit):
        main(_args(teacher, tmp_path / "c", "--attn-impl", "cudnn"))
    assert "--doc-masking false" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
