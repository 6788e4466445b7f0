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


def test_init_is_compiled_once_per_config_and_keys_still_matter():
    """Building the same model again reuses its jitted init (no recompile); another key gives other values,
    another config its own init."""
    import dataclasses

    from models.common import _init_fn

    c = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
    f = _init_fn(Llama, c, jnp.float32)
    assert _init_fn(Llama, dataclasses.replace(c), jnp.float32) is f  # equal configs hash alike
    assert _init_fn(Llama, dataclasses.replace(c, ffn_dim=96), jnp.float32) is not f
    a = init_pure_params(Llama, c, jax.random.key(0), jnp.float32, host_init=False)
    with jax.log_compiles():
        import logging

        seen = []
        handler = logging.Handler()
        handler.emit = lambda rec: seen.append(rec.getMessage())
        logging.getLogger("jax._src.dispatch").addHandler(handler)
        try:
            b = init_pure_params(Llama, c, jax.random.key(1), jnp.float32, host_init=False)
            jax.jit(lambda x: x * 3)(jnp.zeros(3))  # a new program: the handler must hear its compile
        finally:
            logging.getLogger("jax._src.dispatch").removeHandler(handler)
    assert any("jit(<lambda>)" in m for m in seen), seen
    assert not [m for m in seen if "jit(make)" in m], seen
    w_a, w_b = a["layers"][0]["mlp"]["up"]["w"], b["layers"][0]["mlp"]["up"]["w"]
    assert w_a.shape == w_b.shape == (32, 64) and not bool(jnp.array_equal(w_a, w_b))
