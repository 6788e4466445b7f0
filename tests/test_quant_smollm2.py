"""Real weights: SmolLM2-135M's GGUF is Q4_1 (matrices) + Q8_0 (embedding); re-quantizing its
dequantized weights with the same layouts must give them back bit for bit."""
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import tree
from flashit_jax.quant import RTN, QArray, quantize
from flashit_jax.quant.recipes import MATRICES, named_recipe

pytestmark = pytest.mark.slow


def test_w4g32_asym_reproduces_q4_1_and_q8_0(smollm2):
    rules = [(r"embed/w", RTN(bits=8, group_size=32, symmetric=True))] + named_recipe("w4g32-asym")
    assert rules[-1][0] == MATRICES
    q = tree.flatten(quantize(smollm2.params, rules))
    base = tree.flatten(smollm2.params)
    n = 0
    for path, leaf in q.items():
        if isinstance(leaf, QArray):
            np.testing.assert_array_equal(np.asarray(leaf.dequantize(jnp.float32)), np.asarray(base[path]),
                                          err_msg=path)
            n += 1
    assert n == 30 * 7 + 1
