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
# # The ablation report: every acceleration level, alone and stacked, on the same hardware

# %% [markdown]
# Runs on CPU, and on Colab with a GPU or TPU runtime (*Runtime → Change runtime type*). Open it
# from a checkout of the repository (Colab: `!git clone <repository URL>` then open
# `notebooks/ablation.ipynb` from it); the next cell installs the package from that checkout.
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
# `python -m eval.ablation` applies each level (baseline, Pallas kernels, W8 / W4-GPTQ /
# SmoothQuant, Wanda 50% / 2:4 / online pruning, prompt lookup, speculative decoding, a stack, and
# the distilled student / Mamba hybrid when their directories are given) and measures perplexity
# and speed for each row. Rows are cached in the json: running the cell again skips finished rows.
# The default run takes about 20 minutes on 2 CPU cores; SMALL runs three levels of a tiny model.
# On a GPU, `--accelerator` measures speed with random weights of the model's shape (docs/ablation.md).

# %%
from IPython.display import Image, Markdown, display

from eval.ablation.cli import main as ablation

out = os.path.join(NB_OUT, "ablation")
if SMALL:
    args = ["--model", MODEL, "--levels", "baseline,w8,lookup", "--ctx", "64", "--chunks-per-doc", "1",
            "--calib-seqs", "2", "--calib-len", "64", "--prompt-len", "16", "--new-tokens", "16",
            "--prefill-batch", "2", "--no-peers", "--no-progress"]
else:
    args = ["--model", MODEL]
state = ablation(args + ["--out", out])

# %% the table (also in ablation.md) and the Pareto plot (ablation.png)
display(Markdown(open(os.path.join(out, "ablation.md")).read()))
display(Image(os.path.join(out, "ablation.png")))

# %% every row is in the json too, e.g. to compare two levels
rows = state["rows"]
for name in state["order"]:
    r = rows[name]
    if r.get("status") == "ok":
        print(f"{name:32s} ppl {r['ppl']:9.3f}  decode {r['decode_tps']:8.1f} tok/s  size {r['size_mb']:6.1f} MB")
    else:
        print(f"{name:32s} {r['status']}: {r.get('note', '')[:80]}")
