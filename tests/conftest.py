import os
import sys
from pathlib import Path

# The Mosaic GPU interpreter (tests/test_attention_mgpu.py) runs each warpgroup as a thread whose computation
# blocks in barrier callbacks; with XLA's CPU thread pool sized to 2 cores those threads can starve one
# another and hang. XLA sizes the pool from PJRT_NPROC (NPROC in older jaxlibs) when set, before it starts.
os.environ.setdefault("PJRT_NPROC", "8")
os.environ.setdefault("NPROC", "8")


def _cpu_only() -> bool:
    """No GPU or TPU plugin installed (checked without starting a backend, which would read XLA_FLAGS)."""
    import importlib.util

    for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "libtpu"):
        try:
            if importlib.util.find_spec(m):
                return False
        except ModuleNotFoundError:
            pass
    return True


# On CPU most of a test's time is XLA compiling small programs (jax.random alone took 1-3 s a shape on CI's
# 2 cores). LLVM at -O0 and XLA's older elemental emitter for CPU fusions compile them 2-3x faster, and the
# programs are too small for the optimizations to pay back. Measured 2026-12-05 with `pytest -n 2` on 2 cores:
# the ssd + ssm_scan + attention kernel tests 448 s -> 275 s (-O0) -> 180 s (both); speculative + mixtral
# 158 -> 117 -> 82 s. GPU/TPU installs keep XLA's defaults; a flag already in XLA_FLAGS is left as set.
CPU_TEST_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
if _cpu_only():
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join([_flags] + [f"--{k}={v}" for k, v in CPU_TEST_FLAGS.items() if k not in _flags]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
SHARED = Path(os.environ.get("FLASHIT_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M GGUF (downloaded once into the cache), fp32."""
    from flashit_jax.loading import load_model

    return load_model("smollm2-135m", "float32")


@pytest.fixture(scope="session")
def reference_llamacpp():
    import json

    for p in (SHARED / "reference" / "llamacpp_smollm2.json", FIXTURES / "llamacpp_smollm2.json"):
        if p.exists():
            return json.loads(p.read_text())
    pytest.skip("llama.cpp reference json not found")
