"""flashit_jax: stack acceleration levels on a pretrained LLM and measure each one.

Importing the package is cheap: heavy optional dependencies (gguf, datasets, torch) are
imported where they are used.
"""
from flashit_jax.errors import FlashitError

__version__ = "0.1.0"
__all__ = ["FlashitError", "__version__"]
