"""`python -m eval.generate --speculative/--lookup/--medusa` on a tiny saved model."""
import jax
import numpy as np
import pytest

from flashit_jax.loading import save_model
from models import Model
from models.llama import LlamaConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # the SmolLM2 tokenizer's vocabulary, tiny everything else
    cfg = LlamaConfig(vocab_size=49152, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True)
    p = Model(cfg).init_params(jax.random.key(0))
    p = jax.tree.map(lambda x: x * 30 if x.ndim == 2 else x, p)
    d = tmp_path_factory.mktemp("tiny")
    save_model(d, cfg, p)
    return str(d)


def _run(argv):
    from eval.generate import main

    return main(argv)


@pytest.mark.slow  # 20-30 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_speculative_and_lookup_report(tiny_dir, capsys):
    base = ["--model", tiny_dir, "--tokenizer", "smollm2-135m", "--dtype", "fp32", "--max-new-tokens", "12",
            "--no-eos", "--prompt", "To be, or not to be", "--prompt", "ROMEO. But soft"]
    for extra in (["--speculative", "layers=0+2,gamma=3"], ["--lookup", "ngram=2,gamma=4"]):
        res = _run(base + extra)
        out = capsys.readouterr().out
        assert all(res["identical"]), extra
        assert "acceptance rate" in out and "speedup" in out and "greedy output identical to plain decoding: 2/2" in out
        np.testing.assert_array_equal(res["spec"].tokens, res["plain"].tokens)
    assert res["spec"].acceptance_rate < 1.0
    res = _run(base + ["--speculative", f"draft={tiny_dir},gamma=2"])
    assert res["spec"].acceptance_rate == 1.0  # the target as its own draft


def test_medusa_report(tiny_dir, tmp_path, capsys):
    from flashit_jax.decoding.medusa import init_heads, save_heads
    from flashit_jax.loading import load_model

    cfg = load_model(tiny_dir).config
    h = init_heads(cfg, 2, jax.random.key(0))
    h = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), h)
    save_heads(tmp_path, h, {"base": tiny_dir})
    res = _run(["--model", tiny_dir, "--tokenizer", "smollm2-135m", "--dtype", "fp32", "--max-new-tokens", "12",
                "--no-eos", "--medusa", f"heads={tmp_path},tree=3x2"])
    out = capsys.readouterr().out
    assert all(res["identical"]) and "Medusa, 2 heads" in out and "tree 3x2 (9 candidates)" in out


@pytest.mark.parametrize("extra, message", [
    (["--speculative", "gamma=3"], "exactly one of draft=PATH"),
    (["--speculative", "layers=0,gamma=0"], "gamma .* must be an integer >= 1"),
    (["--speculative", "layers=0,size=3"], "bad option 'size=3'"),
    (["--lookup", "ngram=x"], "ngram='x' is not a valid int"),
    (["--lookup", "ngram=2", "--speculative", "layers=0"], "choose one of"),
    (["--speculative", "layers=7"], r"outside 0\.\.2"),
    (["--medusa", "heads=/nonexistent"], "no Medusa heads here"),
])
def test_bad_options(tiny_dir, capsys, extra, message):
    import re

    with pytest.raises(SystemExit) as e:
        _run(["--model", tiny_dir, "--tokenizer", "smollm2-135m", "--dtype", "fp32", "--max-new-tokens", "4"] + extra)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
