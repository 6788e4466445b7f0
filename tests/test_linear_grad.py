"""The backward of the bf16 linear/unembed products: bf16 GEMMs (fp32 accumulation), gradients as autodiff's."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax.nn.linear import fp32_einsum
from models.llama import LlamaConfig
from models import Model


def _dots(jaxpr, batched: bool = True):
    """(lhs dtype, rhs dtype) of every dot_general in a jaxpr, sub-jaxprs included; batched=False
    leaves out products with batch dimensions (attention's: the weight products have none)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and (batched or not eqn.params["dimension_numbers"][1][0]):
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _dots(sub, batched)
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("eq,wshape", [("...i,io->...o", (48, 40)), ("...d,vd->...v", (40, 48))])
def test_fp32_einsum_backward_is_bf16_and_matches_autodiff(eq, wshape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 48)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(wshape) / 7, jnp.float32)  # fp32 master weight, cast in the loss

    def loss(x, w, f):
        return jnp.sum(jnp.sin(f(eq, x, w.astype(jnp.bfloat16)).astype(jnp.bfloat16).astype(jnp.float32)))

    plain = lambda eq, x, w: jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
    ours = jax.grad(loss, argnums=(0, 1))(x, w, fp32_einsum)
    ref = jax.grad(loss, argnums=(0, 1))(x, w, plain)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
    # same products, the cotangent rounded to bf16 once (it already was: the loss rounds the output)
    assert _rel(ours[0], ref[0]) < 1e-2 and _rel(ours[1], ref[1]) < 1e-2
    dots = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=(2,))(x, w, fp32_einsum).jaxpr)
    assert len(dots) == 3 and all(d == ("bfloat16", "bfloat16") for d in dots), dots
    plain_dots = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=(2,))(x, w, plain).jaxpr)
    assert any(d != ("bfloat16", "bfloat16") for d in plain_dots), plain_dots  # what the custom VJP avoids


def _llama_training_grad():
    """(config, fp32 params, jaxpr of the gradient of a bf16 forward of them, as train.step runs it)."""
    c = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True)
    model = Model(c)
    params = model.init_params(jax.random.key(0), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)

    def loss(p):
        pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
        logits, _, _ = model.forward(pb, tokens, attn_impl="xla")
        return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[..., 0])

    return c, params, jax.make_jaxpr(jax.grad(loss))(params).jaxpr


def test_model_training_gradient_has_no_fp32_gemms():
    """A bf16 forward of fp32 master weights (as train.step runs it): every matmul of the gradient is bf16."""
    c, _, jaxpr = _llama_training_grad()
    # attention's own products (q.k, p.v: batched over heads) are the attention kernel's business
    dots = _dots(jaxpr, batched=False)
    assert len(dots) == 3 * (7 * c.n_layers + 1), len(dots)  # forward, dx, dw of 7 projections a layer + the head
    assert all(d == ("bfloat16", "bfloat16") for d in dots), dots


def _dot_outputs(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and not eqn.params["dimension_numbers"][1][0]:
            out.append(str(eqn.outvars[0].aval.dtype))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _dot_outputs(sub)
    return out


def test_training_products_write_bf16_except_the_logits():
    """Projections and every backward product write bf16 themselves (no fp32 result + convert pass);
    only the head's forward product writes fp32 (logits are fp32)."""
    c, params, jaxpr = _llama_training_grad()
    outs = _dot_outputs(jaxpr)
    assert len(outs) == 3 * (7 * c.n_layers + 1)
    assert outs.count("float32") == 1 and outs.count("bfloat16") == len(outs) - 1, outs
    # the forward values are unchanged by where the rounding to bf16 happens (one rounding either way)
    pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 32)), jnp.bfloat16)
    w = pb["layers"][0]["mlp"]["up"]["w"]
    from flashit_jax.nn.linear import lowp_einsum
    got = lowp_einsum("...i,io->...o", x, w)
    want = jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=8e-3, atol=1e-6)


def test_unknown_product_is_a_clear_error():
    from flashit_jax.nn.linear import lowp_einsum

    x = jnp.ones((2, 3), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"einsum 'ij,jk->ik' is not one of"):
        lowp_einsum("ij,jk->ik", x, jnp.ones((3, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"einsum 'ij,jk->ik' is not one of"):
        fp32_einsum("ij,jk->ik", x, jnp.ones((3, 4), jnp.bfloat16))


def _prims(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _prims(sub)
    return out
