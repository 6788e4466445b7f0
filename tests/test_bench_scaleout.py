"""eval.bench_scaleout on fake CPU devices (--tiny, fp32): each part's N-device result equals
1 device, and the collectives show the intended parallelism (subprocesses: the device count is
fixed when jax starts)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(n_devices: int, counts: str, parts: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "eval.bench_scaleout", "--tiny", "--devices", counts, "--parts", parts,
                           "--budget", "900", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# Scale-out: cpu")
    for name, part in rep["parts"].items():
        assert part["status"] == "ok", (name, part["status"])
        errors = [r for r in part["rows"] if "error" in r]
        assert not errors, errors
    return rep


def _check_moe(rows, counts):
    assert [r["devices"] for r in rows] == counts
    for r in rows[1:]:
        n = r["devices"]
        assert r["experts_per_device"] == [8 // n]
        assert r["max_rel_diff"] <= 1e-6 and r["rel_l2_diff"] <= 1e-6, r
        assert "all-reduce" in r["collectives"], r  # partial outputs summed over the expert axis


def _check_decode(rows, counts):
    ref = next(r for r in rows if r["config"] == "1 device, XLA")
    assert ref["distinct_tokens"] > 4, ref  # the token comparison below means something
    tp = [r for r in rows if r["config"].startswith("tensor=")]
    # XLA matmuls (the default under a mesh) and our GEMV kernel per weight block (interpreted)
    assert [r["config"] for r in tp] == [f"tensor={n}{v}" for n in counts[1:] for v in ("", " + GEMV")]
    for r in tp:
        assert r["tokens_equal"] and r["logits_rel_diff"] <= 1e-5, r
        coll = r["collectives_per_call"]
        assert "all-reduce" in coll, coll
        # activations only: the smallest weight matrix is 128 x 128 fp32 = 64 KB
        assert max(v[1] for v in coll.values()) < 16384, coll
        # the checks the GPU run reports: within bf16-style tolerance of fp32, fp32 tokens equal
        assert r["collectives_ok"] and r["max_collective_bytes"] <= r["collective_limit_bytes"], r
        assert r["fp32_tokens_equal"] and r["logits_rel_err_fp32"] <= 1e-5 and r["check_ok"], r


@pytest.mark.slow  # 20-100 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_moe_and_decode_2_devices(tmp_path):
    rep = _run(2, "1,2", "moe,decode", tmp_path)
    _check_moe(rep["parts"]["moe"]["rows"], [1, 2])
    _check_decode(rep["parts"]["decode"]["rows"], [1, 2])


@pytest.mark.slow
def test_all_parts_8_devices(tmp_path):
    rep = _run(8, "1,2,8", "train,moe,decode", tmp_path)
    train = rep["parts"]["train"]["rows"]
    assert [r["config"] for r in train] == ["1 device", "data=2", "fsdp=2", "data=8", "fsdp=8"]
    for r in train[1:]:
        # N devices on N row blocks = the mean of the 1-device losses of those blocks (fp32)
        assert r["loss_rel_diff"] <= 1e-5, r
        assert r["per_device_batch"] == train[0]["per_device_batch"]
        assert "all-reduce" in r["collectives"], r  # gradients (data) / partial sums (fsdp)
        if r["config"].startswith("fsdp"):
            assert "all-gather" in r["collectives"], r  # parameters gathered for the layers
    _check_moe(rep["parts"]["moe"]["rows"], [1, 2, 8])
    _check_decode(rep["parts"]["decode"]["rows"], [1, 2, 8])


def test_error_text_keeps_the_cause():
    """A custom_partitioner failure is a long traceback with the cause at its end: results.json keeps
    the tail and the type, the table cell the type and the last characters."""
    from eval.bench_scaleout import _cell, error_text

    msg = "custom_partitioner: Traceback (most recent call last):\n" + "  File x.py, line 1\n" * 400
    msg += "ValueError: Sharding on head dim is not allowed."
    text = error_text(RuntimeError(msg))
    assert text.startswith("RuntimeError: custom_partitioner") and text.endswith("head dim is not allowed.")
    assert len(text) < 2000
    assert error_text(ValueError("short")) == "ValueError: short"
    cell = _cell(text)
    assert cell.startswith("RuntimeError: ...") and cell.endswith("head dim is not allowed.") and len(cell) <= 240
