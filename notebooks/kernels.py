# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Kernels: the pure-jnp reference beside the Pallas kernel, and a timing

# %% [markdown]
# Runs on CPU, and on Colab with a GPU or TPU runtime (*Runtime → Change runtime type*). Open it
# from a checkout of the repository (Colab: `!git clone <repository URL>` then open
# `notebooks/kernels.ipynb` from it); the next cell installs the package from that checkout.
# The project runs these notebooks on CPU in its tests (tiny settings) — not on Colab or a TPU yet.

# %% install (from the checkout this notebook lives in)
import importlib.util
import os
import shutil
import subprocess
import sys

ROOT = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd()))
             if os.path.exists(os.path.join(p, "pyproject.toml")) and os.path.isdir(os.path.join(p, "flashit_jax"))), None)
if ROOT is None:
    raise RuntimeError("open this notebook from a checkout of flashit_jax (its notebooks/ folder)")
missing = [m for m in ("jax", "flax", "optax", "orbax", "gguf", "tokenizers", "safetensors", "matplotlib")
           if importlib.util.find_spec(m) is None]
if missing:  # Colab: jax is there (with CUDA or TPU support), the rest is not
    extra = "" if importlib.util.find_spec("jax") else ("[cuda12]" if shutil.which("nvidia-smi") else
                                                        "[tpu]" if os.environ.get("COLAB_TPU_ADDR") else "")
    print("installing", ROOT + extra, "for", missing)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", ROOT + extra])
sys.path.insert(0, ROOT)  # this checkout's code, whatever else is installed
os.chdir(ROOT)

# %% runtime check
import jax

print("jax", jax.__version__, "| backend:", jax.default_backend(), "|", jax.devices())
ON_CPU = jax.default_backend() == "cpu"

# %% settings: the tests set FLASHIT_JAX_NB_MODEL to a tiny random model and FLASHIT_JAX_NB_SMALL=1
MODEL = os.environ.get("FLASHIT_JAX_NB_MODEL", "smollm2-135m")
SMALL = os.environ.get("FLASHIT_JAX_NB_SMALL", "0") == "1"

# %% [markdown]
# Every kernel ships a reference in plain `jax.numpy` and one or more Pallas kernels behind one
# `api.attention(..., impl=...)`. On a GPU `impl="pallas"` runs the Triton-lowered flash
# attention, on a TPU the Mosaic one; on a CPU the same kernel runs in Pallas' interpret mode
# (slow, for testing). Full sweeps and benchmarks: docs/attention.md, `python -m kernels.attention.bench`.

# %%
import time

import jax.numpy as jnp
import numpy as np

from kernels.attention import api, reference

B, T, H, KV, D = (1, 128, 4, 2, 64) if (SMALL or ON_CPU) else (4, 4096, 32, 8, 128)
dtype = jnp.float32 if ON_CPU else jnp.bfloat16
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (B, T, H, D), dtype)
k = jax.random.normal(kk, (B, T, KV, D), dtype)
v = jax.random.normal(kv, (B, T, KV, D), dtype)

ref = jax.jit(lambda q, k, v: reference.attention(q, k, v, q_positions=None, kv_lengths=None, causal=True))
pal = jax.jit(lambda q, k, v: api.attention(q, k, v, impl="pallas", q_positions=None, kv_lengths=None,
                                          causal=True))
err = float(jnp.max(jnp.abs(ref(q, k, v).astype(jnp.float32) - pal(q, k, v).astype(jnp.float32))))
tol = 1e-4 if dtype == jnp.float32 else 3e-2  # fp32: summation order only; bf16: ~8 bits of mantissa
print(f"max |reference - pallas| = {err:.2e} (tolerance {tol:g}, {jnp.dtype(dtype).name})")
assert err < tol


# %% timing: kernel vs the best alternative, measured in this run
def timed(f, *args, n=20):
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


t_xla = timed(ref, q, k, v)
if ON_CPU:
    print(f"XLA reference: {1e3 * t_xla:.2f} ms. On a CPU the Pallas kernel is interpreted, so its time says "
          "nothing about the kernel: run this notebook on a GPU or TPU runtime for the comparison.")
else:
    t_pal = timed(pal, q, k, v)
    rows = [("xla", t_xla), ("pallas", t_pal)]
    if jax.default_backend() == "gpu":
        cud = jax.jit(lambda q, k, v: api.attention(q, k, v, impl="cudnn", q_positions=None, kv_lengths=None,
                                              causal=True))
        try:
            rows.append(("cudnn", timed(cud, q, k, v)))
        except Exception as e:  # cuDNN missing or this shape unsupported
            print("cudnn:", type(e).__name__, e)
    flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
    for name, t in rows:
        print(f"{name:8s} {1e3 * t:8.3f} ms  {flops / t / 1e12:6.1f} TFLOP/s  pallas speedup {t / t_pal:.2f}x")
