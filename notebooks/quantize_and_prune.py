# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quantization and pruning: pytree transforms and their perplexity table

# %% [markdown]
# Runs on CPU, and on Colab with a GPU or TPU runtime (*Runtime → Change runtime type*). Open it
# from a checkout of the repository (Colab: `!git clone <repository URL>` then open
# `notebooks/quantize_and_prune.ipynb` from it); the next cell installs the package from that checkout.
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
# Every compression method is a pure function of the parameter pytree: `quantize(params, recipe,
# calib)` turns matched matrices into `QArray` leaves (packed codes + scales), `prune(params,
# recipe, calib)` into sparse leaves; `flashit_jax.nn.linear` dispatches on the leaf type, so the
# model code is unchanged. GPTQ, AWQ, SmoothQuant and Wanda need calibration statistics
# (`calibrate`: the inputs of every linear over a few sequences).

# %%
import matplotlib.pyplot as plt

from eval.ablation.cli import size_mb
from eval.perplexity import evaluate
from flashit_jax.data import load_documents
from flashit_jax.loading import load_model
from flashit_jax.quant import calibrate, calibration_tokens, quantize

loaded = load_model(MODEL, "fp32")
model, params, tok = loaded.model, loaded.params, loaded.tokenizer
valid = load_documents("bundled", "valid")
CTX, CHUNKS = (64, 1) if SMALL else (512, 3)
tokens = calibration_tokens(tok, load_documents("bundled", "train"), n_seqs=2 if SMALL else 8,
                            seq_len=64 if SMALL else 512)
calib = calibrate(model, params, tokens, progress=False)


def ppl(p):
    return evaluate(model, p, tok, valid, ctx=CTX, max_chunks=CHUNKS, progress=False)["ppl"]


# %% quantize: int8 per channel, 4-bit groups of 64 (RTN and GPTQ), SmoothQuant W8A8
variants = {"baseline": params}
for recipe in ["w8", "w4g64", "w4g64-gptq", "w8a8-smoothquant"]:
    variants[recipe] = quantize(params, recipe, calib)
print(variants["w4g64-gptq"]["layers"][0]["mlp"]["up"]["w"])

# %% prune: Wanda 50% unstructured and 2:4 (the package lands with the pruning work)
try:
    from flashit_jax.prune import prune
except ModuleNotFoundError:
    print("flashit_jax.prune is not in this checkout: pruning rows left out")
else:
    for recipe in ["wanda-50", "wanda-2:4"]:
        variants[recipe] = prune(params, recipe, calib)
    print(variants["wanda-50"]["layers"][0]["mlp"]["up"]["w"])

# %% the table
rows = [(name, size_mb(p), ppl(p)) for name, p in variants.items()]
base = rows[0][2]
print("| variant | size MB | ppl | Δ% |\n|---|---:|---:|---:|")
for name, mb, q in rows:
    print(f"| {name} | {mb:.1f} | {q:.3f} | {100 * (q / base - 1):+.2f} |")

fig, ax = plt.subplots(figsize=(6, 4))
for name, mb, q in rows:
    ax.scatter(mb, q)
    ax.annotate(name, (mb, q), fontsize=8, xytext=(4, 3), textcoords="offset points")
ax.set_xlabel("size MB (floats counted as bf16)")
ax.set_ylabel(f"perplexity (bundled valid, ctx {CTX})")
ax.grid(alpha=0.3)
plt.show()
