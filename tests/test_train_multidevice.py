"""Scale-out: the same training run on 1 device, on 8 (fake CPU) devices sharded data x fsdp x tensor,
and on 2 processes joined by jax.distributed, gives the same losses and parameters.

Each run is a subprocess (the device count is fixed when jax starts)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny_lm import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "teacher")


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", JAX_ENABLE_X64="0")
    return env


def _args(teacher, out, *extra):
    # lr 1e-3: see test_train_run.test_accumulation_equals_one_big_batch
    return [sys.executable, "-m", "train.distill", "--teacher", str(teacher), "--student", "layers=0,2",
            "--loss", "mix", "--data", "bundled", "--seq-len", "32", "--batch-size", "8", "--steps", "3",
            "--log-every", "1", "--eval-every", "0", "--eval-ctx", "32", "--eval-max-chunks", "1", "--progress",
            "false", "--compute-dtype", "fp32", "--warmup-steps", "0", "--lr", "1e-3", "--ckpt-every", "0",
            "--out", str(out), *extra]


def _losses(out):
    recs = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["loss"], r["ce"], r["kd"]] for r in recs if "loss" in r])


def _params(out):
    from safetensors.numpy import load_file

    return load_file(str(Path(out) / "model" / "model.safetensors"))


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    return (num / sum(float(np.sum(a[k].astype(np.float64) ** 2)) for k in a)) ** 0.5


def _run(cmd, env, timeout=600):
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def one_device(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    _run(_args(teacher, out), _env(1))
    return out


def test_sharded_step_on_8_devices_equals_1_device(teacher, one_device, tmp_path):
    out = tmp_path / "eight"
    _run(_args(teacher, out, "--mesh-data", "2", "--mesh-fsdp", "2", "--mesh-tensor", "2"), _env(8))
    text = (out / "sharding.txt").read_text()
    assert text.startswith("mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1} over 8 devices")
    assert "model/layers/0/mlp/up/w: (32, 64) P('fsdp', 'tensor')" in text
    assert "model/embed/w: (" in text and "P('tensor', 'fsdp')" in text
    l1, l8 = _losses(one_device), _losses(out)
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    assert _rel(_params(out), _params(one_device)) <= 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_two_processes_jax_distributed_give_the_one_process_loss(teacher, one_device, tmp_path):
    out = tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen(_args(teacher, out, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                    "--process-id", str(i), "--ckpt-every", "2"),
                              env=_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append(err)
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(e[-3000:] for e in errs)
    assert "over 2 devices, 2 processes" in (out / "sharding.txt").read_text()
    np.testing.assert_allclose(_losses(out), _losses(one_device), rtol=1e-6)
    assert _rel(_params(out), _params(one_device)) <= 1e-6
    assert (out / "ckpt" / "2").is_dir()
