"""Iterative magnitude pruning and lottery-ticket rewinding through the training stack (tiny model,
in-process, one CPU device): rewinding restores the early weights exactly; pruned weights stay 0
through re-fine-tuning; the rounds reach their sparsities exactly."""
import json

import numpy as np
import pytest

from flashit_jax import FlashitError, tree


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny_lm import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", n_layers=2)


def _args(model, out, *extra):
    return ["--model", str(model), "--data", "bundled", "--seq-len", "32", "--batch-size", "4", "--log-every", "1",
            "--eval-every", "0", "--eval-ctx", "32", "--eval-max-chunks", "1", "--progress", "false",
            "--compute-dtype", "fp32", "--warmup-steps", "0", "--lr", "1e-2", "--out", str(out), *extra]


def test_imp_masks_exact_and_monotone():
    from flashit_jax.prune import iterative as it

    rng = np.random.default_rng(0)
    params = {"layers": {0: {"mlp": {"up": {"w": rng.normal(size=(16, 24)).astype(np.float32)},
                                     "down": {"w": rng.normal(size=(24, 16)).astype(np.float32)}}}}}
    k1 = it.imp_masks(params, None, it.round_sparsity(0.2, 1))
    total = 2 * 16 * 24
    assert sum((~k).sum() for k in k1.values()) == round(0.2 * total)
    # round 2 on weights where the survivors shrank: every weight pruned in round 1 stays pruned
    shrunk = tree.unflatten({p: np.where(k1[p], v * 0.01, v * 100) for p, v in tree.flatten(params).items()})
    k2 = it.imp_masks(shrunk, k1, it.round_sparsity(0.2, 2))
    assert sum((~k).sum() for k in k2.values()) == round(0.36 * total)
    assert all(np.all(~k1[p] <= ~k2[p]) for p in k1)
    with pytest.raises(FlashitError, match="below"):
        it.imp_masks(params, k2, 0.1)


@pytest.mark.slow  # 20-100 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_rewinding_restores_the_early_weights_exactly(teacher, tmp_path):
    """θ_k from the dense run's checkpoint equals the weights of a separate k-step run, bit for
    bit; the rewound start point is θ_k with the pruned weights zeroed; re-training keeps them 0."""
    from flashit_jax import prune as pr
    from flashit_jax.loading import load_model
    from flashit_jax.prune import iterative as it
    from train.config import parse_args
    from train.finetune import main as finetune
    from train.imp import checkpoint_params, run_imp

    # a constant learning rate, so that a 2-step run is the first 2 steps of the 5-step one
    const = ("--min-lr-ratio", "1.0")
    cfg = parse_args(_args(teacher, tmp_path / "lt", "--steps", "5", *const), defaults={"loss": "ce", "teacher": ""})
    rec = run_imp(cfg, rounds=2, rate=0.3, rewind_step=2, mode="rewind", log=lambda *_: None)
    finetune(_args(teacher, tmp_path / "k2", "--steps", "2", "--ckpt-every", "0", *const))
    direct = tree.flatten(load_model(str(tmp_path / "k2" / "model"), "fp32").params)
    base = load_model(str(teacher), "fp32")
    early = tree.flatten(checkpoint_params(tmp_path / "lt" / "round_0", 2, base.model, base.params, cfg))
    assert set(early) == set(direct)
    for p in direct:
        np.testing.assert_array_equal(np.asarray(early[p]), np.asarray(direct[p]), err_msg=p)
    # the rewound start of round 1 is θ_k masked; training it keeps the pruned weights at 0
    r0 = load_model(rec["rounds_detail"][0]["model"], "fp32").params
    keep = it.imp_masks(r0, None, 0.3)
    start = tree.flatten(it.rewind(tree.unflatten(early), keep))
    for p, v in start.items():
        want = np.where(keep[p], early[p], 0) if p in keep else early[p]
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want), err_msg=p)
    r1 = load_model(rec["rounds_detail"][1]["model"], "fp32").params
    masks1 = pr.masks_of(r1)
    assert set(masks1) == set(keep) and all(np.array_equal(np.asarray(masks1[p]), keep[p]) for p in keep)
    dense1 = tree.flatten(pr.densify(r1))
    assert all(np.all(np.asarray(dense1[p])[~keep[p]] == 0) for p in keep)
    moved = [p for p in keep if not np.array_equal(np.asarray(dense1[p]), np.asarray(start[p]))]
    assert moved  # the survivors did train
    # rounds hit their total sparsities: 1 - 0.7^r of the layer matrices
    sp = [r["sparsity"] for r in rec["rounds_detail"]]
    assert sp[0] == 0 and sp[1] == pytest.approx(0.3, abs=1e-3) and sp[2] == pytest.approx(0.51, abs=1e-3)
    summary = json.loads((tmp_path / "lt" / "imp.json").read_text())
    assert summary["mode"] == "rewind" and len(summary["rounds_detail"]) == 3


@pytest.mark.slow  # 20 s on 2 cores (2026-12-05): the masks' algebra stays in test_imp_masks_exact_and_monotone
def test_refinetune_keeps_the_masks(teacher, tmp_path):
    """train.finetune on a pruned directory: the survivors train, the same masks and weight type
    come back, and the pruned weights are still exactly 0."""
    from eval.prune import main as prune_cli
    from flashit_jax import prune as pr
    from flashit_jax.loading import load_model
    from train.finetune import main as finetune

    pruned = prune_cli(["--model", str(teacher), "--recipe", "magnitude-2:4", "--out", str(tmp_path / "p")])
    finetune(_args(pruned, tmp_path / "a", "--steps", "2", "--ckpt-every", "0"))
    p0 = load_model(str(pruned), "fp32").params
    a = load_model(str(tmp_path / "a" / "model"), "fp32").params
    m0, ma = pr.masks_of(p0), pr.masks_of(a)
    assert m0 and set(m0) == set(ma) and all(np.array_equal(np.asarray(m0[k]), np.asarray(ma[k])) for k in m0)
    assert type(tree.flatten(a)["layers/0/mlp/up/w"]).__name__ == "NMArray"
    d0, da = tree.flatten(pr.densify(p0)), tree.flatten(pr.densify(a))
    for k in m0:
        assert np.all(np.asarray(da[k])[~np.asarray(m0[k])] == 0), k
    assert any(not np.array_equal(np.asarray(d0[k]), np.asarray(da[k])) for k in m0)


@pytest.mark.slow  # three training runs; the loop's resume is covered by tests/test_train_resume.py
def test_refinetune_resumes_bit_identical(teacher, tmp_path):
    """A pruned re-fine-tune stopped after its step-2 checkpoint and started again ends bit-identical
    to one that did not stop (the keep-masks come back with the train state)."""
    import shutil

    from eval.prune import main as prune_cli
    from train.finetune import main as finetune

    pruned = prune_cli(["--model", str(teacher), "--recipe", "magnitude-50", "--out", str(tmp_path / "p")])
    args = ("--steps", "4", "--ckpt-every", "2", "--async-checkpoints", "false")
    finetune(_args(pruned, tmp_path / "ref", *args))
    run = tmp_path / "run"
    finetune(_args(pruned, run, *args))
    shutil.rmtree(run / "ckpt" / "4")  # as if killed between the checkpoints of steps 2 and 4
    shutil.rmtree(run / "model")
    s = finetune(_args(pruned, run, *args))
    assert s["resumed_from"] == 2
    assert (run / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()


def test_imp_bad_input(teacher, tmp_path):
    from train.config import parse_args
    from train.imp import run_imp

    cfg = parse_args(_args(teacher, tmp_path / "x", "--steps", "4"), defaults={"loss": "ce", "teacher": ""})
    with pytest.raises(FlashitError, match="rewind-step"):
        run_imp(cfg, rounds=1, rate=0.2, rewind_step=4, mode="rewind")
    with pytest.raises(FlashitError, match="sparsity must be"):
        run_imp(cfg, rounds=1, rate=1.0, rewind_step=2, mode="rewind")
    with pytest.raises(FlashitError, match="mode"):
        run_imp(cfg, rounds=1, rate=0.2, rewind_step=2, mode="rewound")
