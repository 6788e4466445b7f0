"""The expert GEMV (kernels/gemv/experts.py; Pallas interpret mode on CPU) against per-row XLA products."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gemv import experts
from kernels.gemv.gpu import Blocks

SMALL = Blocks(bk=32, bn=32, target_programs=16)


def _want(x, w, ids):
    return jnp.einsum("rk,rkn->rn", x.astype(jnp.float32), w[ids].astype(jnp.float32), precision="highest")


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# K and N not multiples of the tiles; a repeated expert; the last expert; 1 to MAX_ROWS rows
@pytest.mark.parametrize("ids", [[3], [2, 0], [1, 1, 3], list(range(4)) * 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_expert_matvec(ids, dtype):
    rng = np.random.default_rng(len(ids))
    e, k, n = 4, 100, 72
    ids = jnp.asarray(ids, jnp.int32)
    x = jnp.asarray(rng.standard_normal((len(ids), k)), dtype)
    g, u = (jnp.asarray(rng.standard_normal((e, k, n)), dtype) for _ in range(2))
    got_g, got_u = experts.expert_matvec(x, (g, u), ids, blocks=SMALL, interpret=True)
    # fp32 sums of exact products (bf16 x bf16 fits fp32) in another order: ~sqrt(K) * 2^-24
    assert got_g.dtype == jnp.float32 and got_g.shape == (len(ids), n)
    assert _rel(got_g, _want(x, g, ids)) < 1e-5
    assert _rel(got_u, _want(x, u, ids)) < 1e-5


def test_swiglu_experts_default_blocks():
    rng = np.random.default_rng(0)
    e, d, f = 3, 64, 160
    x = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)
    gate, up = (jnp.asarray(rng.standard_normal((e, d, f)) / 8, jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((e, f, d)) / 12, jnp.float32)
    ids = jnp.asarray([2, 0], jnp.int32)
    got = experts.swiglu_experts(x, gate, up, down, ids, interpret=True)
    a = jax.nn.silu(_want(x, gate, ids)) * _want(x, up, ids)
    assert _rel(got, _want(a, down, ids)) < 1e-5


def test_swiglu_experts_gradients():
    """Differentiable (decoding rarely needs it, a tiny training batch might): the XLA backward's gradients."""
    rng = np.random.default_rng(3)
    e, d, f = 3, 32, 48
    x = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) / 6, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    ids = jnp.asarray([1, 1], jnp.int32)  # one expert twice: its gradient sums both rows; the others get zero

    def loss(x, g, u, dn, fn):
        return jnp.sum(jnp.sin(fn(x, g, u, dn)))

    def ref(x, g, u, dn):
        ga, ua = experts.reference(x, (g, u), ids)
        (y,) = experts.reference(jax.nn.silu(ga) * ua, (dn,), ids)
        return y

    got = jax.grad(loss, argnums=(0, 1, 2, 3))(x, *ws, lambda x, g, u, dn: experts.swiglu_experts(
        x, g, u, dn, ids, blocks=SMALL, interpret=True))
    want = jax.grad(loss, argnums=(0, 1, 2, 3))(x, *ws, ref)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5
    assert float(jnp.max(jnp.abs(got[1][0]))) == 0.0 and float(jnp.max(jnp.abs(got[1][1]))) > 0


def test_bad_input_names_the_problem():
    w = jnp.zeros((2, 8, 4), jnp.float32)
    with pytest.raises(ValueError, match="x has 6 features"):
        experts.expert_matvec(jnp.zeros((1, 6)), (w,), jnp.zeros(1, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="one expert per row"):
        experts.expert_matvec(jnp.zeros((2, 8)), (w,), jnp.zeros(3, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="stacks of one shape"):
        experts.expert_matvec(jnp.zeros((1, 8)), (w, jnp.zeros((2, 8, 5))), jnp.zeros(1, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="9 rows"):
        experts.expert_matvec(jnp.zeros((9, 8)), (w,), jnp.zeros(9, jnp.int32), interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel for real")
def test_expert_matvec_on_gpu():
    rng = np.random.default_rng(0)
    e, k, n = 8, 4096, 14336
    ids = jnp.asarray([5, 2], jnp.int32)
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((e, k, n)), jnp.bfloat16)
    (got,) = experts.expert_matvec(x, (g,), ids)
    assert _rel(got, _want(x, g, ids)) < 1e-5
