"""What every report records: the device, versions and date that produced a figure."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path

import jax


def device_info() -> dict:
    d = jax.devices()[0]
    return {"device": f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}",
            "jax_version": jax.__version__, "date": datetime.date.today().isoformat()}


def write_json(path: str | Path | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2))


def setup_jax() -> None:
    """fp32 matmuls at full precision on GPU/TPU too (perplexity parity); bf16 runs are unaffected."""
    jax.config.update("jax_default_matmul_precision", "highest")


@contextlib.contextmanager
def env_switches(switches: dict[str, str]):
    """Set environment variables for a block (a benchmark row, a notebook's kernel) and restore them after."""
    old = {k: os.environ.get(k) for k in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
