"""Sparse decode kernels (N:M weights, activation-sparse GEMV) vs their jnp references, in Pallas'
interpreter on CPU, plus their Triton lowering. Tolerances: fp32 ~1e-5 relative (fp32 sums in a
different order); bf16 inputs: both sides accumulate the same bf16 products in fp32, ~1e-5 too,
the output cast to bf16 adds 2^-8 relative."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sparse_matmul import api, gpu, reference as ref

SMALL = gpu.Blocks(bk=8, bn=16, target_programs=8)  # several programs and K splits at test sizes


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def nm_weight(k, n_out, n, m, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, n_out)).astype(np.float32)
    g = np.abs(w).reshape(k // m, m, n_out)
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, np.argsort(-g, axis=1)[:, :n], True, axis=1)
    keep = keep.reshape(k, n_out)
    values, meta = ref.nm_compress(jnp.asarray(w, dtype), jnp.asarray(keep), n, m)
    return w, keep, values, meta


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_compress_roundtrip_and_layout(n, m):
    w, keep, values, meta = nm_weight(32, 24, n, m)
    assert values.shape == (n, 32 // m, 24) and meta.dtype == ref.meta_dtype(n, m)
    dense = np.asarray(ref.nm_decompress(values, meta, n, m))
    np.testing.assert_array_equal(dense, np.where(keep, w, 0))
    # plane p holds the p-th kept weight of each group, in row order
    pos = np.asarray(ref.nm_positions(meta, n, m))
    assert np.all(np.diff(pos, axis=0) > 0)
    g, c = 3, 5
    rows = np.flatnonzero(keep[g * m:(g + 1) * m, c])
    np.testing.assert_array_equal(pos[:, g, c], rows)


def test_nm_compress_pads_short_groups():
    w = np.arange(1, 17, dtype=np.float32).reshape(8, 2)
    keep = np.zeros((8, 2), bool)
    keep[1, 0] = True  # one value in the first group of column 0, none elsewhere
    values, meta = ref.nm_compress(jnp.asarray(w), jnp.asarray(keep), 2, 4)
    np.testing.assert_array_equal(np.asarray(ref.nm_decompress(values, meta, 2, 4)), np.where(keep, w, 0))


@pytest.mark.parametrize("rows,k,cols,n,m,dtype", [
    (1, 64, 48, 2, 4, jnp.float32), (3, 128, 40, 2, 4, jnp.float32), (1, 64, 32, 4, 8, jnp.float32),
    (2, 96, 16, 1, 4, jnp.float32), (1, 256, 64, 2, 4, jnp.bfloat16), (8, 64, 24, 4, 8, jnp.bfloat16)])
def test_nm_kernel_matches_reference(rows, k, cols, n, m, dtype):
    _, _, values, meta = nm_weight(k, cols, n, m, seed=k + cols, dtype=dtype)
    x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.float32).astype(dtype)
    want = ref.nm_matmul(x.astype(jnp.float32), values.astype(jnp.float32), meta, n=n, m=m)
    for blocks in (gpu.Blocks(), SMALL):
        got = gpu.nm_matvec(x, values, meta, n=n, m=m, blocks=blocks, interpret=True)
        assert got.shape == (rows, cols) and got.dtype == jnp.float32
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("rows,k,cols,dtype,t", [
    (1, 64, 48, jnp.float32, 0.5), (3, 100, 40, jnp.float32, 1.0), (1, 256, 64, jnp.bfloat16, 0.7),
    (2, 64, 24, jnp.bfloat16, 0.0), (1, 64, 32, jnp.float32, 10.0)])
def test_act_sparse_kernel_matches_reference(rows, k, cols, dtype, t):
    x = jax.random.normal(jax.random.key(k), (rows, k), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(cols), (k, cols), jnp.float32).astype(dtype)
    want = ref.act_sparse_matmul(x.astype(jnp.float32), w.astype(jnp.float32), t)
    xs = ref.sparsify_activations(x, t)
    for blocks in (gpu.Blocks(), SMALL):
        got = gpu.act_sparse_matvec(xs, w, blocks=blocks, interpret=True)
        if t >= 10.0:  # every input dropped: exactly zero, no weight read
            assert float(jnp.max(jnp.abs(got))) == 0.0
        else:
            assert rel(got, want) < 1e-5


def test_act_sparse_kernel_never_reads_dropped_rows():
    """Rows of W at dropped inputs hold NaN: a kernel that read them would return NaN."""
    k, cols = 64, 32
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.float32)
    t = 0.8
    dropped = np.abs(np.asarray(x[0])) <= t
    w = np.random.default_rng(0).normal(size=(k, cols)).astype(np.float32)
    want = np.asarray(x)[:, ~dropped] @ w[~dropped]
    w[dropped] = np.nan
    got = api.act_sparse_matmul(x, jnp.asarray(w), t, impl="interpret")
    assert np.all(np.isfinite(np.asarray(got))) and rel(got, want) < 1e-5


def test_api_leading_dims_grad_and_choice():
    _, _, values, meta = nm_weight(64, 32, 2, 4)
    x = jax.random.normal(jax.random.key(1), (2, 1, 64), jnp.float32)
    want = api.nm_matmul(x, values, meta, n=2, m=4, impl="xla")
    got = api.nm_matmul(x, values, meta, n=2, m=4, impl="interpret")
    assert got.shape == (2, 1, 32) and rel(got, want) < 1e-5
    g = lambda impl: jax.grad(lambda x: jnp.sum(api.nm_matmul(x, values, meta, n=2, m=4, impl=impl) ** 2))(x)  # noqa
    assert rel(g("interpret"), g("xla")) < 1e-5
    w = jax.random.normal(jax.random.key(2), (64, 32), jnp.float32)
    ga = lambda impl: jax.grad(lambda x: jnp.sum(api.act_sparse_matmul(x, w, 0.5, impl=impl) ** 2))(x)  # noqa
    assert rel(ga("interpret"), ga("xla")) < 1e-5
    assert api.choose(1, jnp.bfloat16, jnp.bfloat16) == "xla"  # CPU: no kernel
    with pytest.raises(ValueError, match="no sparse Pallas kernel"):
        api.choose(1, jnp.bfloat16, jnp.bfloat16, impl="pallas")
    with pytest.raises(ValueError, match="rows"):
        api.choose(64, jnp.float32, jnp.float32, impl="interpret")


def test_gather_alternative_is_exact_with_enough_capacity():
    x = jax.random.normal(jax.random.key(3), (1, 128), jnp.float32)
    w = jax.random.normal(jax.random.key(4), (128, 16), jnp.float32)
    cap = int(np.sum(np.abs(np.asarray(x)) > 0.6))
    got = ref.act_sparse_gather_matmul(x, w, 0.6, cap)
    assert rel(got, ref.act_sparse_matmul(x, w, 0.6)) < 1e-6


def _lower_cuda(fn, *args):
    exp = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    return exp.mlir_module()


def test_gpu_kernels_lower_to_triton():
    """Lowering to Triton runs on CPU (cross-platform export): catches unsupported ops in CI."""
    S = jax.ShapeDtypeStruct
    txt = _lower_cuda(lambda x, w: gpu.act_sparse_matvec(x, w), S((1, 2048), jnp.bfloat16), S((2048, 8192), jnp.bfloat16))
    assert "xla.gpu.triton" in txt
    for n, m in ((2, 4), (4, 8)):
        txt = _lower_cuda(lambda x, v, meta: gpu.nm_matvec(x, v, meta, n=n, m=m), S((1, 2048), jnp.bfloat16),
                          S((n, 2048 // m, 8192), jnp.bfloat16), S((2048 // m, 8192), ref.meta_dtype(n, m)))
        assert "xla.gpu.triton" in txt
