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
# # Distillation: a short `train.distill` run and its curves

# %% [markdown]
# Runs on CPU, and on Colab with a GPU or TPU runtime (*Runtime → Change runtime type*). Open it
# from a checkout of the repository (Colab: `!git clone <repository URL>` then open
# `notebooks/distill.ipynb` from it); the next cell installs the package from that checkout.
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
NB_OUT = os.environ.get("FLASHIT_JAX_NB_OUT", "out/notebooks")  # under the checkout (git-ignored)

# %% [markdown]
# `train.distill` trains a student (here: a subset of the teacher's layers, initialised from them)
# against the teacher's soft targets mixed with the data's cross-entropy. The full recipe and its
# result (KD beats CE for a 6-layer student) are in docs/training.md; this is a short run.

# %%
from IPython.display import Image, display

from train.distill import main as distill

out = os.path.join(NB_OUT, "distill")
args = ["--teacher", MODEL, "--data", "bundled", "--out", out, "--progress", "false", "--loss", "mix"]
if SMALL:
    args += ["--student", "layers=0,2", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
             "--ckpt-every", "0", "--eval-ctx", "32", "--eval-max-chunks", "1", "--compute-dtype", "fp32",
             "--log-every", "1", "--warmup-steps", "0"]
else:
    args += ["--student", "layers=0,6,12,18,24,29", "--steps", "60", "--batch-size", "4", "--seq-len", "128",
             "--eval-every", "20", "--log-every", "5", "--eval-ctx", "256", "--eval-max-chunks", "2"]
    if ON_CPU:
        args += ["--compute-dtype", "fp32"]
summary = distill(args)
print({k: summary[k] for k in ("step", "eval_ppl", "wall_s") if k in summary})

# %% the curves train.distill drew (loss, its CE and KD terms, held-out perplexity)
display(Image(os.path.join(out, "curves.png")))

# %% the saved student is a model directory like any other
from eval.perplexity import evaluate
from flashit_jax.data import load_documents
from flashit_jax.loading import load_model

student = load_model(os.path.join(out, "model"))
print(student.config.n_layers, "layers;", student.transforms[-1])
rep = evaluate(student.model, student.params, student.tokenizer, load_documents("bundled", "valid"),
               ctx=32 if SMALL else 256, max_chunks=1 if SMALL else 2, progress=False)
print(f"student perplexity {rep['ppl']:.2f}")
