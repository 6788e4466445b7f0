"""eval.prune_online's speed run and report on CPU (tiny model, kernels in the Pallas interpreter):
the GPU script's code path cannot crash on a typo; the rows it reports are the ones asked for."""
import json

import pytest


@pytest.mark.slow  # compiles the decode of four variants and the interpreted kernels (~1-2 min on 2 cores)
def test_speed_smoke_and_report(tmp_path):
    from eval.prune_online import main

    rep = main(["speed", "--smoke", "--sparsities", "0.25,0.5", "--new-tokens", "4", "--json", str(tmp_path / "s.json")])
    names = [r["variant"] for r in rep["decode"]]
    assert names == ["dense", "online-25", "online-50", "2:4", "dense (again)"]
    assert [r.get("dropped_fraction") for r in rep["decode"][1:3]] == [0.25, 0.5]
    assert all(r["tokens_per_s"] > 0 for r in rep["decode"])
    curve = {"model": "m", "data": "bundled:valid", "ctx": 32, "n_chunks": 1, "baseline_ppl": 10.0,
             "calibration": {"data": "bundled:train", "sequences": 1, "seq_len": 32}, "allocation": "uniform",
             "device": "cpu", "jax_version": "x", "date": "d",
             "points": [{"target": 0.5, "ppl": 11.0, "delta_pct": 10.0, "held_out_fraction": 0.5}]}
    (tmp_path / "c.json").write_text(json.dumps(curve))
    text = main(["report", "--curve", str(tmp_path / "c.json"), "--speed", str(tmp_path / "s.json")])
    row = next(ln for ln in text.splitlines() if ln.startswith("| 0.50 |"))
    online50 = next(r for r in rep["decode"] if r["variant"] == "online-50")
    assert f"{online50['speedup']:.2f}x" in row and "+10.00%" in row
