"""train.finetune with BitNet QAT and with (Q)LoRA on a tiny model: what is saved is what was
trained, the frozen base stays frozen, LoRA runs resume from checkpoints without the base."""
import json

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_lm import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", n_layers=2)


def _args(model, out, *extra):
    return ["--model", str(model), "--data", "bundled", "--seq-len", "32", "--batch-size", "4", "--steps", "2",
            "--eval-every", "0", "--ckpt-every", "0", "--eval-ctx", "32", "--eval-max-chunks", "1", "--progress",
            "false", "--compute-dtype", "fp32", "--warmup-steps", "0", "--lr", "1e-2", "--log-every", "1",
            "--out", str(out), *extra]


def _eval(path):
    from eval.perplexity import evaluate
    from flashit_jax.data import load_documents
    from flashit_jax.loading import load_model

    m = load_model(str(path))
    return m, evaluate(m.model, m.params, m.tokenizer, load_documents("bundled", "valid"), ctx=32, max_chunks=1,
                       progress=False)["ppl"]


def test_bitnet_finetune_saves_the_packed_trained_model(tiny, tmp_path):
    from flashit_jax import tree
    from flashit_jax.quant import TernaryArray
    from train.finetune import main

    s = main(_args(tiny, tmp_path / "b", "--qat-method", "bitnet"))
    m, ppl = _eval(tmp_path / "b" / "model")
    assert isinstance(tree.flatten(m.params)["layers/1/mlp/up/w"], TernaryArray)
    assert m.transforms[-1]["qat"]["method"] == "bitnet-b1.58"
    assert ppl == pytest.approx(s["eval_ppl"], rel=1e-5)  # the loop evaluated the packed model


@pytest.mark.parametrize("base", [pytest.param("", marks=pytest.mark.slow), "w4g16"])  # 31 / 39 s; QLoRA here
def test_lora_finetune_trains_adapters_only(tiny, tmp_path, base):
    from flashit_jax import lora, tree
    from flashit_jax.loading import load_model
    from flashit_jax.quant import quantize
    from train.finetune import main

    extra = ["--lora-rank", "4", "--lora-alpha", "8"] + (["--lora-base", base] if base else [])
    s = main(_args(tiny, tmp_path / "l", *extra))
    merged, ppl = _eval(tmp_path / "l" / "model")
    ad, meta = lora.load_adapters(tmp_path / "l" / "adapters.safetensors")
    assert meta["rank"] == 4 and meta["base"] == (base or "float")
    b = np.asarray(tree.flatten(ad)["layers/0/attn/q/w/b"])
    assert np.abs(b).max() > 0  # trained away from zero
    orig = load_model(str(tiny)).params
    frozen = quantize(orig, base) if base else orig
    w0 = tree.flatten(frozen)["layers/0/attn/q/w"]
    w0 = w0.dequantize(jnp.float32) if base else w0
    a = tree.flatten(ad)["layers/0/attn/q/w/a"]
    want = np.asarray(w0) + 2.0 * np.asarray(a) @ b  # alpha / rank = 2
    got = np.asarray(tree.flatten(merged.params)["layers/0/attn/q/w"], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())  # saved in bf16
    # non-adapted parameters are the base's, bit for bit (norms) / to bf16 (the embedding)
    np.testing.assert_array_equal(np.asarray(merged.params["final_norm"]["scale"], np.float32),
                                  np.asarray(jnp.asarray(orig["final_norm"]["scale"], jnp.bfloat16), np.float32))
    assert ppl == pytest.approx(s["eval_ppl"], rel=1e-4)


@pytest.mark.slow
def test_lora_run_resumes_without_the_base_in_checkpoints(tiny, tmp_path):
    import shutil

    from train.finetune import main

    out = tmp_path / "r"
    args = ["--lora-rank", "2", "--lora-base", "w4g16", "--ckpt-every", "1", "--steps", "3",
            "--async-checkpoints", "false"]
    full = main(_args(tiny, out, *args))
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # as if the run had been killed after step 2: drop the last checkpoint and what came after it
    shutil.rmtree(out / "ckpt" / "3")
    shutil.rmtree(out / "model")
    s = main(_args(tiny, out, *args))
    assert s["resumed_from"] == 2
    a = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in a] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    assert s["eval_ppl"] == pytest.approx(full["eval_ppl"], rel=1e-5)


def test_lora_and_qat_do_not_combine(tiny, tmp_path):
    from train.finetune import main

    with pytest.raises(SystemExit) as e:
        main(_args(tiny, tmp_path / "x", "--lora-rank", "2", "--qat-method", "bitnet"))
    assert e.value.code == 2
