"""A run SIGKILLed after some checkpoint and started again ends bit-identical to an uninterrupted run.

The objective samples the teacher's labels (hard-label KD with sampling), so the restored RNG
matters as much as the restored parameters, optimizer state and data position."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny_lm import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "teacher")


def _cmd(teacher, out):
    return [sys.executable, "-m", "train.distill", "--teacher", str(teacher), "--student", "layers=0,2",
            "--loss", "mix", "--kd-loss", "hard", "--hard-sample", "true", "--temperature", "1.5",
            "--data", "bundled", "--seq-len", "32", "--batch-size", "4", "--steps", "60", "--log-every", "5",
            "--eval-every", "0", "--eval-ctx", "32", "--eval-max-chunks", "1", "--progress", "false",
            "--compute-dtype", "fp32", "--warmup-steps", "5", "--lr", "3e-3", "--ckpt-every", "1",
            "--keep-checkpoints", "2", "--out", str(out)]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


def _train_losses(out):
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


# ~55 s on 2 cores: in CI's slow phase (.ci/run runs it after the default tests)
@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(teacher, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(_cmd(teacher, ref), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    p = subprocess.Popen(_cmd(teacher, run), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (run / "ckpt" / "6").is_dir() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "model").exists()
    killed_at = max(int(d.name) for d in (run / "ckpt").iterdir() if d.name.isdigit())
    assert killed_at < 60

    r = subprocess.run(_cmd(teacher, run), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    resumed_from = json.loads((run / "summary.json").read_text())["resumed_from"]
    assert 6 <= resumed_from < 60
    assert (run / "model" / "model.safetensors").read_bytes() == (ref / "model" / "model.safetensors").read_bytes()
    assert _train_losses(run) == _train_losses(ref)
