import os
import sys
from pathlib import Path

# The Mosaic GPU interpreter (tests/test_attention_mgpu.py) runs each warpgroup as a thread whose computation
# blocks in barrier callbacks; with XLA's CPU thread pool sized to 2 cores those threads can starve one
# another and hang. XLA sizes the pool from PJRT_NPROC (NPROC in older jaxlibs) when set, before it starts.
os.environ.setdefault("PJRT_NPROC", "8")
os.environ.setdefault("NPROC", "8")

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
