"""eval.hybrid_bench / eval.decode_bench on a tiny Llama-3-style shape: the scanned decode equals
one call per token, the recurrent check passes, the table has every variant, bad input is refused."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import Model, configs, hybrid

TINY = "test-hybrid-bench-tiny"


@pytest.fixture(scope="module", autouse=True)
def tiny_shapes():
    base = dataclasses.replace(configs.SHAPES["llama-3.2-1b"], vocab_size=256, dim=64, n_heads=4, n_kv_heads=2,
                               ffn_dim=128, n_layers=4)
    configs.register_shape(TINY, base)
    for pct in (50, 100):
        configs.register_shape(f"{TINY}-hybrid{pct}", hybrid.hybrid_shape(base, pct / 100, gate=False))
    yield
    for name in (TINY, f"{TINY}-hybrid50", f"{TINY}-hybrid100"):
        configs.SHAPES.pop(name, None)


@pytest.mark.slow  # 15 s on 2 cores (2026-12-06): scanned decode steps stay in tests/test_generate.py
def test_scanned_steps_equal_one_call_per_token():
    from eval.decode_bench import _filled_cache, _step, _steps

    model = Model(configs.SHAPES[f"{TINY}-hybrid50"])
    params = model.init_params(jax.random.key(0))
    a = _filled_cache(model, params, 8, 8, jnp.float32, jax.random.key(1))
    b = jax.tree.map(jnp.copy, a)
    tok_a = tok_b = jnp.array([3], jnp.int32)
    toks_a = []
    for _ in range(4):
        tok_a, a = _step(params, a, tok_a, model=model)
        toks_a.append(int(tok_a[0]))
    toks_b = []
    for _ in range(2):
        tok_b, b = _steps(params, b, tok_b, model=model, n=2)
        toks_b.append(int(tok_b[0]))
    assert toks_b == toks_a[1::2]
    assert int(a.lengths[0]) == int(b.lengths[0]) == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 20-30 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_hybrid_bench_rows_check_and_table(tmp_path):
    from eval.hybrid_bench import main

    ppl = tmp_path / "ppl.json"
    ppl.write_text(json.dumps({"ppl": {"0": 10.0, "50": 12.5, "100": 20.0}}))
    out = tmp_path / "h.json"
    rows = main(["--shapes", TINY, "--contexts", "16,32", "--steps", "3", "--per-call", "2", "--dtype", "fp32",
                 "--check", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert [(r["variant"], r["context"]) for r in rows] == [(v, c) for v in ("0", "50", "100") for c in (16, 32)]
    assert all(r["per_call"] == 2 and r["tokens_per_s"] > 0 for r in rows) and rec["steps"] == 4
    assert [c["ok"] for c in rec["checks"]] == [True, True]
    mem = {(r["variant"], r["context"]): r["cache_MiB_per_seq"] for r in rows}
    assert mem[("100", 16)] == mem[("100", 32)]  # the mixers' state does not grow with the context
    assert mem[("0", 32)] == pytest.approx(2 * mem[("0", 16)])
    assert "| 50% |  | " in rec["tables"][TINY]  # perplexities belong to SmolLM2-135M only
    rows = main(["--shapes", TINY, "--variants", "0", "--contexts", "16", "--steps", "1", "--budget-s", "1e-9",
                 "--ppl", str(ppl)])
    assert rows == []  # over budget before the first variant: skipped, not half-run


@pytest.mark.parametrize("argv, msg", [(["--variants", "25"], "unknown variants"),
                                       (["--shapes", "nope"], "no registered shape"),
                                       (["--contexts", "1k"], "--contexts must be integers"),
                                       (["--per-call", "0"], ">= 1"),
                                       (["--ppl", "/nonexistent.json"], "no such file")])
def test_bad_input(argv, msg, capsys):
    from eval.hybrid_bench import main

    with pytest.raises(SystemExit):
        main(["--shapes", TINY, *argv])
    assert msg in capsys.readouterr().err
