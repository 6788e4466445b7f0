"""Grouped matmul kernels (interpret mode on CPU) against jax.lax.ragged_dot.

fp32 inputs with exact (HIGHEST) products: only summation order differs, so 1e-5 relative;
bf16 inputs: both sides accumulate in fp32 and round the output once, 1e-2 relative.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.grouped_matmul import api, common, reference

BLOCKS = common.BlockSizes(block_m=16, block_n=32, block_k=16)
CASES = [
    # (group sizes, M): uneven sizes, an empty group, rows past the groups (zero tail)
    ([5, 0, 19, 9], 40),
    ([0, 0, 0], 12),  # everything is tail: all zeros
    ([16, 16], 32),  # tile-aligned groups, no tail
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(sizes, m, k=32, n=64, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("impl", ["triton", "tpu"])
@pytest.mark.parametrize("sizes,m", CASES)
def test_forward_matches_ragged_dot(impl, sizes, m):
    lhs, rhs, gs = _inputs(sizes, m)
    out = api.grouped_matmul(lhs, rhs, gs, impl=impl, block_sizes=BLOCKS, interpret=True)
    ref = jax.lax.ragged_dot(lhs, rhs, gs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    total = int(sum(sizes))
    assert np.all(np.asarray(out)[total:] == 0.0)
    if total:
        assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "tpu"])
def test_transpose_rhs(impl):
    from kernels.grouped_matmul import gpu, tpu

    lhs, rhs, gs = _inputs([7, 0, 20], 30)
    fn = gpu.gmm if impl == "triton" else tpu.gmm
    out = fn(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, block_sizes=BLOCKS, interpret=True)
    assert _rel(out, jax.lax.ragged_dot(lhs, rhs, gs)) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "tpu"])
def test_gradients_match_ragged_dot(impl):
    lhs, rhs, gs = _inputs([9, 0, 14, 3], 30, seed=1)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((30, 64)), jnp.float32)

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b) * cot)

    ours = jax.grad(loss(lambda a, b: api.grouped_matmul(a, b, gs, impl=impl, block_sizes=BLOCKS,
                                                           interpret=True)), argnums=(0, 1))(lhs, rhs)
    ref = jax.grad(loss(lambda a, b: jax.lax.ragged_dot(a, b, gs)), argnums=(0, 1))(lhs, rhs)
    assert _rel(ours[0], ref[0]) < 1e-5
    assert _rel(ours[1], ref[1]) < 1e-5
    assert np.all(np.asarray(ours[1])[1] == 0.0)  # the empty group gets a zero gradient
    assert np.all(np.asarray(ours[0])[26:] == 0.0)  # tail rows feed nothing


def test_rhs_grad_against_masked_definition():
    from kernels.grouped_matmul import gpu

    lhs, _, gs = _inputs([4, 0, 11], 20)
    d = jnp.asarray(np.random.default_rng(3).standard_normal((20, 64)), jnp.float32)
    out = gpu.tgmm(lhs, d, gs, num_groups=3, block_sizes=BLOCKS, interpret=True)
    assert _rel(out, reference.transposed_grouped_matmul(lhs, d, gs, 3)) < 1e-5


def test_bf16_forward():
    lhs, rhs, gs = _inputs([20, 3, 0, 25], 48, dtype=jnp.bfloat16, seed=4)
    out = api.grouped_matmul(lhs, rhs, gs, impl="triton", block_sizes=BLOCKS, interpret=True)
    ref = reference.grouped_matmul_dense(lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs)
    assert out.dtype == jnp.bfloat16
    assert _rel(out, ref) < 1e-2


def test_preferred_element_type():
    lhs, rhs, gs = _inputs([6, 10], 16, dtype=jnp.bfloat16)
    out = api.grouped_matmul(lhs, rhs, gs, impl="triton", block_sizes=BLOCKS, interpret=True,
                             preferred_element_type=jnp.float32)
    ref = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    assert _rel(out, ref) < 1e-5


def test_dense_reference_equals_ragged_dot():
    lhs, rhs, gs = _inputs([3, 0, 8], 14)
    assert _rel(reference.grouped_matmul_dense(lhs, rhs, gs), jax.lax.ragged_dot(lhs, rhs, gs)) < 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_schedule_covers_every_row_once(seed):
    rng = np.random.default_rng(seed)
    g, bm = int(rng.integers(1, 9)), int(rng.choice([4, 8, 16]))
    sizes = rng.integers(0, 20, size=g) * rng.integers(0, 2, size=g)
    m = int(sizes.sum() + rng.integers(0, 10)) or 1
    s = common.make_schedule(jnp.asarray(sizes, jnp.int32), m, bm)
    offs, gids, tids = (np.asarray(x) for x in (s.offsets, s.group_ids, s.tile_ids))
    assert len(gids) == common.num_work_items(m, bm, g)
    hits = np.zeros(m, int)
    for gi, t in zip(gids, tids):
        rows = np.arange(t * bm, (t + 1) * bm)
        hits[rows[(rows >= offs[gi]) & (rows < offs[gi + 1])]] += 1
    np.testing.assert_array_equal(hits, 1)
    # items of one group are consecutive and the sentinel items come last
    active = int(s.num_active)
    assert np.all(gids[active:] == g + 1)
    assert np.all(np.diff(gids[:active]) >= 0)


def test_bad_shapes():
    lhs, rhs, gs = _inputs([4, 4], 8)
    with pytest.raises(ValueError, match="lhs \\[M, K\\]"):
        api.grouped_matmul(lhs[:, :16], rhs, gs)
    with pytest.raises(ValueError, match="multiples of 16"):
        api.grouped_matmul(lhs[:, :30], rhs[:, :30], gs, impl="triton", interpret=True)
    with pytest.raises(ValueError, match="unknown grouped matmul impl"):
        api.grouped_matmul(lhs, rhs, gs, impl="cuda")


def test_triton_kernel_lowers_for_cuda(monkeypatch):
    """The Triton lowering runs on CPU too, and the module it makes must verify: this catches
    what XLA's Triton parser would reject on the GPU before a GPU sees it."""
    from jax._src.pallas.triton import lowering as triton_lowering

    from kernels.grouped_matmul import gpu

    verified = []
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()
        verified.append(True)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)

    lhs = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((4,), jnp.int32)
    for rhs, t in [((4, 128, 256), False), ((4, 256, 128), True)]:
        f = jax.jit(lambda a, b, c, t=t: gpu.gmm(a, b, c, transpose_rhs=t))
        text = f.trace(lhs, jax.ShapeDtypeStruct(rhs, jnp.bfloat16), gs).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text
    f = jax.jit(lambda a, b, c: gpu.tgmm(a, b, c, num_groups=4))
    text = f.trace(lhs, jax.ShapeDtypeStruct((256, 256), jnp.bfloat16), gs).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
    assert len(verified) == 3
