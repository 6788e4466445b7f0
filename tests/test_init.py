"""Random init on the host (what GPUs use: XLA's GPU compile of per-tensor RNG kernels took 116 s
for SmolLM2-135M on an H100) gives the same parameters as init on the default device."""
import jax
import jax.numpy as jnp

from models.common import init_pure_params
from models.llama import Llama, LlamaConfig


def test_host_init_equals_device_init():
    c = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    a = init_pure_params(Llama, c, jax.random.key(3), jnp.bfloat16, host_init=False)
    b = init_pure_params(Llama, c, jax.random.key(3), jnp.bfloat16, host_init=True)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype == jnp.bfloat16 and x.shape == y.shape
        assert bool(jnp.array_equal(x, y))
        assert y.devices() == {jax.devices()[0]}
    assert float(jnp.std(a["layers"][0]["mlp"]["up"]["w"].astype(jnp.float32))) > 0  # not all zeros
