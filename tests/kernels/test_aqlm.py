"""AQLM decode kernel (lookup + accumulate) vs the XLA reference (dequantize, then dot), interpreted.

Tolerances: codebooks are fp16 and the activations are promoted to fp32 before the table is
built, so kernel and reference compute the same fp32 sums in a different order: ~1e-6
relative. For bf16 activations the reference is taken on the same (exact) fp32 values of x.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.aqlm import api, gpu
from kernels.aqlm import reference as ref

RTOL = 2e-5


def make(rng, k, n, m=2, bits=8, d=8):
    codes = rng.integers(0, 2**bits, (m, k // d, n)).astype(ref.code_dtype(bits))
    cb = (rng.normal(size=(m, 2**bits, d)) * 0.1).astype(np.float16)
    s = rng.uniform(0.5, 1.5, (1, n)).astype(np.float16)
    return jnp.asarray(codes), jnp.asarray(cb), jnp.asarray(s)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_dequantize_formula():
    rng = np.random.default_rng(0)
    codes, cb, s = make(rng, 16, 4, m=2, bits=3)
    w = np.asarray(ref.dequantize(codes, cb, s))
    c, b, sc = np.asarray(codes), np.asarray(cb, np.float32), np.asarray(s, np.float32)
    for g, i, n in [(0, 0, 0), (1, 7, 3), (1, 2, 1)]:
        want = sc[0, n] * (b[0, c[0, g, n], i] + b[1, c[1, g, n], i])
        assert w[g * 8 + i, n] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("rows,k,n,m,bits,d", [(1, 256, 128, 2, 8, 8), (1, 576, 192, 2, 8, 8), (3, 512, 64, 1, 12, 8),
                                               (2, 128, 256, 3, 4, 4), (8, 1024, 32, 2, 8, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_interpret(rows, k, n, m, bits, d, dtype):
    rng = np.random.default_rng(rows * k + n)
    codes, cb, s = make(rng, k, n, m, bits, d)
    x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    want = ref.matmul(x.astype(jnp.float32), codes, cb, s)
    got = gpu.aqlm_matmul(x, codes, cb, s, out_dtype=jnp.float32, interpret=True)
    assert rel(got, want) < RTOL
    assert rel(ref.matmul_lut(x, codes, cb, s, out_dtype=jnp.float32), want) < RTOL


def test_kernel_explicit_blocks_and_splits():
    rng = np.random.default_rng(1)
    codes, cb, s = make(rng, 1024, 256)
    x = jnp.asarray(rng.normal(size=(2, 1024)), jnp.float32)
    want = ref.matmul(x, codes, cb, s)
    for b in (gpu.BlockSizes(block_n=64, block_g=8, k_splits=4), gpu.BlockSizes(block_n=256, block_g=32)):
        assert rel(gpu.aqlm_matmul(x, codes, cb, s, blocks=b, interpret=True), want) < RTOL
    for g, n in ((512, 14336), (512, 1024), (72, 576)):  # decode: K split until ~2 programs per SM
        b = gpu.default_blocks(1, g, n)
        assert not gpu.supported(1, g, n, b)
        steps = g // b.block_g
        assert (n // b.block_n) * b.k_splits >= 2 * 132 or steps % (2 * b.k_splits) or steps // (2 * b.k_splits) < 2


def test_supported_reasons_and_api():
    assert "rows" in gpu.supported(64, 64, 128)
    assert "column tile" in gpu.supported(1, 64, 24)
    rng = np.random.default_rng(2)
    codes, cb, s = make(rng, 256, 128)
    x = jnp.asarray(rng.normal(size=(2, 1, 256)), jnp.float32)
    assert api.choose(2, 32, 128) == "xla"  # CPU: no kernel
    with pytest.raises(ValueError, match="no Pallas kernel"):
        api.choose(2, 32, 128, impl="pallas")
    y = api.aqlm_matmul(x, codes, cb, s, impl="interpret")
    assert y.shape == (2, 1, 128)
    assert rel(y, api.aqlm_matmul(x, codes, cb, s, impl="xla")) < RTOL
    f = lambda impl: jax.grad(lambda x: jnp.sum(api.aqlm_matmul(x, codes, cb, s, impl=impl) ** 2))(x)  # noqa: E731
    assert rel(f("interpret"), f("xla")) < 1e-5
    big = jnp.asarray(rng.normal(size=(32, 256)), jnp.float32)  # prefill: the XLA path even when asked
    assert rel(api.aqlm_matmul(big, codes, cb, s, impl="interpret"), ref.matmul(big, codes, cb, s)) < 1e-6


def test_kernel_lowers_to_triton():
    """Cross-platform export: the Triton lowering runs on CPU and catches unsupported ops in CI."""
    S = jax.ShapeDtypeStruct
    exp = jax.export.export(jax.jit(lambda x, c, b, s: gpu.aqlm_matmul(x, c, b, s)), platforms=("cuda",),
                            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((1, 4096), jnp.bfloat16), S((2, 512, 14336), jnp.uint8), S((2, 256, 8), jnp.float16),
        S((1, 14336), jnp.float16))
    assert "xla.gpu.triton" in exp.mlir_module()
    jax.export.export(jax.jit(lambda x, c, b, s: gpu.aqlm_matmul(x, c, b, s)), platforms=("cuda",),
                      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((4, 576), jnp.float32), S((1, 72, 1536), jnp.uint16), S((1, 65536, 8), jnp.float16),
        S((1, 1536), jnp.float16))
