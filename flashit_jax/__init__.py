"""flashit_jax: stack acceleration levels on a pretrained LLM and measure each one.

Importing the package is cheap: heavy optional dependencies (gguf, datasets, torch) are
imported where they are used.
"""
import importlib.util as _util
from pathlib import Path as _Path

from flashit_jax.errors import FlashitError


def _check_kernels_package() -> None:
    """Our Pallas kernels live in the top-level package `kernels`; Hugging Face's `kernels`
    distribution (required by transformers >= 5.25) installs a package of the same name, and
    whichever comes first on sys.path wins. Fail here, by name, rather than later with
    "No module named 'kernels.gemv'"."""
    spec = _util.find_spec("kernels")
    ours = _Path(__file__).resolve().parents[1] / "kernels"
    if spec is not None and spec.origin and _Path(spec.origin).resolve().parent != ours:
        raise ImportError(f"the package 'kernels' found first on sys.path is {_Path(spec.origin).parent}, not "
                          f"flashit_jax's {ours}: most likely Hugging Face's `kernels` (a dependency of "
                          "transformers >= 5.25). Use transformers < 5.25 (`pip install 'transformers<5.25'` and "
                          "`pip uninstall kernels`), as the `parity` extra pins it.")


_check_kernels_package()

__version__ = "0.1.0"
__all__ = ["FlashitError", "__version__"]
