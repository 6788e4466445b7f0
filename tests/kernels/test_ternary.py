"""Ternary (BitNet b1.58) format and matmul: packing round-trips, the Pallas kernel (interpret
mode) equals the XLA reference exactly (int8 x ternary accumulates exactly in int32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ternary import api, gpu
from kernels.ternary import reference as ref


def _ternary(shape, seed=0, p_zero=0.4):
    rng = np.random.default_rng(seed)
    t = rng.choice([-1, 1], size=shape) * (rng.random(shape) >= p_zero)
    return t.astype(np.int8)


@pytest.mark.parametrize("shape", [(1, 4), (3, 8), (64, 96), (2, 5, 16)])
def test_pack_roundtrip(shape):
    t = _ternary(shape, 1)
    p = ref.pack(jnp.asarray(t))
    assert p.dtype == jnp.uint8 and p.shape == (*shape[:-1], shape[-1] // 4)
    np.testing.assert_array_equal(np.asarray(ref.unpack(p)), t)
    np.testing.assert_array_equal(ref.unpack(ref.pack(t)), t)  # numpy path too


def test_pack_layout_is_quarters():
    """byte [k, j] holds columns j, j + N/4, j + N/2, j + 3N/4 (code = t + 1) in bits 0-1 .. 6-7."""
    t = np.zeros((1, 8), np.int8)
    t[0, 1], t[0, 3], t[0, 5], t[0, 7] = 1, -1, 1, 0  # columns 1 and 3 share byte 1 (quarters of 2)
    p = np.asarray(ref.pack(t))
    assert p.shape == (1, 2)
    # byte 0: columns 0, 2, 4, 6 -> codes 1, 1, 1, 1; byte 1: columns 1, 3, 5, 7 -> codes 2, 0, 2, 1
    assert p[0, 0] == 1 | 1 << 2 | 1 << 4 | 1 << 6
    assert p[0, 1] == 2 | 0 << 2 | 2 << 4 | 1 << 6


def test_pack_rejects_bad_width():
    with pytest.raises(ValueError, match="4 columns"):
        ref.pack(np.zeros((2, 6), np.int8))


def test_absmean_ternary():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
    t, s = ref.absmean_ternary(w)
    assert s.shape == (1, 1)
    np.testing.assert_allclose(float(s[0, 0]), float(jnp.mean(jnp.abs(w))), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(t), np.clip(np.round(np.asarray(w) / float(s[0, 0])), -1, 1))
    _, s2 = ref.absmean_ternary(w, axis=0)
    assert s2.shape == (1, 16)


def _problem(m, k, n, seed, per_col=False):
    key = jax.random.key(seed)
    x = jax.random.normal(key, (m, k), jnp.float32)
    xq, sx = ref.quantize_rows_int8(x)
    t = _ternary((k, n), seed + 1)
    sw = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 1.5, (1, n if per_col else 1)), jnp.float32)
    return xq, sx, ref.pack(jnp.asarray(t)), sw, t


def test_reference_equals_float_math():
    xq, sx, p, sw, t = _problem(5, 64, 32, 3)
    want = (np.asarray(xq, np.float64) * np.asarray(sx)) @ (t.astype(np.float64) * np.asarray(sw))
    got = ref.ternary_matmul(xq, sx, p, sw, n=32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# (M, K, N, k_splits, per-column scales): decode (M=1, padded to a 16-row tile), K split
# (int32 partial sums), prefill-like M not a multiple of the tile, SmolLM2's K=576 (9 x 64).
CASES = [(1, 64, 64, 1, False), (1, 256, 128, 2, False), (7, 128, 256, 1, True), (40, 576, 64, 3, True),
         (16, 96, 64, 1, False)]


@pytest.mark.parametrize("m,k,n,splits,per_col", CASES)
def test_kernel_equals_reference(m, k, n, splits, per_col):
    xq, sx, p, sw, _ = _problem(m, k, n, 10 + m, per_col)
    n4 = n // 4
    b = gpu.default_blocks(m, k, n4)
    block_k = 32 if k % 64 else 64
    b = gpu.BlockSizes(block_m=b.block_m, block_n=min(16, n4), block_k=block_k, k_splits=splits)
    assert gpu.supported(m, k, n, b) == ""
    got = gpu.ternary_matmul(xq, sx, p, sw, n=n, blocks=b, interpret=True)
    want = ref.ternary_matmul(xq, sx, p, sw, n=n)
    # int32 accumulation is exact in both; the fp32 epilogue (acc * sx * sw) is the same product
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)
    assert got.shape == (m, n)


def test_api_interpret_bf16_out_and_batch_dims():
    xq, sx, p, sw, _ = _problem(6, 64, 64, 4)
    got = api.ternary_matmul(xq.reshape(2, 3, 64), sx.reshape(2, 3, 1), p, sw, n=64, out_dtype=jnp.bfloat16,
                             impl="interpret")
    want = ref.ternary_matmul(xq, sx, p, sw, n=64, out_dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 3, 64)
    np.testing.assert_array_equal(np.asarray(got.reshape(6, 64), np.float32), np.asarray(want, np.float32))


def test_unsupported_shapes_fall_back_or_raise():
    assert "multiple of 4" in gpu.supported(1, 64, 30)
    assert "row step" in gpu.supported(1, 48, 64)
    with pytest.raises(ValueError, match="unknown ternary impl"):
        api.choose(1, 64, 64, "cuda")
    assert api.choose(1, 48, 64, "auto") == "xla"  # CPU here; K=48 has no kernel anyway
    with pytest.raises(ValueError):
        api.choose(1, 48, 64, "interpret")


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (16, 4096, 14336), (512, 4096, 14336), (100, 1536, 576)])
def test_gpu_kernel_lowers_to_triton(m, k, n):
    """The Triton lowering of the benchmark's block configurations runs on CPU (cross-platform
    export): catches operations Triton cannot lower without a GPU."""
    S = jax.ShapeDtypeStruct
    fn = jax.jit(lambda a, b, c, d: gpu.ternary_matmul(a, b, c, d, n=n, out_dtype=jnp.bfloat16))
    exp = jax.export.export(fn, platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((m, k), jnp.int8), S((m, 1), jnp.float32), S((k, n // 4), jnp.uint8), S((1, 1), jnp.float32))
    assert "xla.gpu.triton" in exp.mlir_module()
