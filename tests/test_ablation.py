"""eval.ablation end to end on a tiny random Llama with a real (tiny) tokenizer: the rows, the
columns, the files, the resume cache, and the baseline's perplexity against eval.perplexity."""
import json
import math

import pytest

from tiny_lm import make_tiny_model

SMALL = ["--data", "bundled", "--ctx", "64", "--chunks-per-doc", "1", "--calib-seqs", "2", "--calib-len", "64",
         "--prompt-len", "16", "--new-tokens", "16", "--prefill-batch", "2", "--no-peers", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("abl") / "tiny", n_layers=2, dim=64)


@pytest.fixture(scope="module")
def two_levels(tiny, tmp_path_factory):
    from eval.ablation.cli import main

    out = tmp_path_factory.mktemp("abl_out")
    state = main(["--model", str(tiny), "--levels", "baseline,w8", "--out", str(out), *SMALL])
    return state, out


def test_two_level_ablation_columns_present_and_finite(two_levels):
    from eval.ablation.report import NUMERIC

    state, out = two_levels
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["order"] == ["baseline", "w8"]
    for name in ("baseline", "w8"):
        row = saved["rows"][name]
        assert row["status"] == "ok", row
        for key in NUMERIC:
            assert key in row, (name, key)
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key, row[key])
        assert row["decode_tps"] > 0 and row["prefill_tps"] > 0 and row["peak_mem_mb"] > 0
    base, w8 = saved["rows"]["baseline"], saved["rows"]["w8"]
    assert base["delta_pct"] == 0.0 and base["speedup"] == 1.0
    assert w8["size_mb"] < base["size_mb"]  # int8 codes + scales < bf16-counted floats
    assert abs(w8["delta_pct"]) < 5.0  # int8 per-channel RTN barely moves a model's perplexity
    md = (out / "ablation.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert len(table) == 2
    for ln in table:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(NUMERIC) + 2 and all(c and c != "—" for c in cells[1:-1]), ln
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_baseline_perplexity_equals_eval_perplexity(two_levels, tiny, tmp_path):
    from eval.perplexity import main as ppl_main

    state, _ = two_levels
    js = tmp_path / "ppl.json"
    ppl_main(["--model", str(tiny), "--data", "bundled", "--split", "valid", "--ctx", "64", "--max-chunks", "1",
              "--json", str(js)])
    ref = json.loads(js.read_text())
    base = state["rows"]["baseline"]
    assert base["n_chunks"] == ref["n_chunks"]
    assert base["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)


def test_rerun_skips_finished_rows_and_reports_unavailable(two_levels, tiny, capsys):
    from eval.ablation.cli import main

    state, out = two_levels
    before = json.loads((out / "ablation.json").read_text())["rows"]["w8"]
    capsys.readouterr()
    state2 = main(["--model", str(tiny), "--levels", "baseline,w8,student", "--out", str(out), *SMALL])
    printed = capsys.readouterr().out
    assert "w8: done before" in printed
    assert state2["rows"]["w8"]["decode_tps"] == before["decode_tps"]  # from the cache, not re-measured
    st = state2["rows"]["student"]
    assert st["status"] == "skipped" and "--student DIR" in st["note"]


def test_stack_order_and_bad_levels():
    from eval.ablation import levels as L
    from flashit_jax.errors import FlashitError

    assert L.canonical("lookup+w8") == L.canonical("w8+lookup") == "w8+lookup"
    assert L.canonical("baseline+w4-gptq") == "w4-gptq"
    with pytest.raises(FlashitError, match="unknown level"):
        L.parse_stack("w9")
    with pytest.raises(FlashitError, match="at most one quant level"):
        L.parse_stack("w8+w4-gptq")
    assert [lv.name for lv in L.quality_stack(L.parse_stack("w8+speculative"))] == ["w8"]
