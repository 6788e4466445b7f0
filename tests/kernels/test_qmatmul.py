"""Quantized matmul kernels vs the XLA reference (dequantize, then dot), in Pallas' interpreters.

Tolerances: codes and bf16/fp32 activations are exact in the kernels' input dtype and every
product accumulates in fp32, so kernel and reference differ only in summation order:
~1e-6 relative for fp32 and bf16 inputs alike (both compute on the same bf16-rounded x).
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.qmatmul import api, gpu, reference as ref, tpu

RTOL = 2e-5


def make(rng, k, n, bits, group, symmetric, scale_dtype=np.float16):
    packing = ref.packing_for(bits, symmetric)
    if packing == "i8":
        codes = rng.integers(-127, 128, (k, n))
    else:
        codes = rng.integers(0, 1 << bits, (k, n))
    g = k // group
    s = rng.uniform(0.005, 0.02, (g, n)).astype(scale_dtype)
    z = None if symmetric else rng.uniform(-0.1, 0.0, (g, n)).astype(scale_dtype)
    return packing, jnp.asarray(ref.pack(codes, packing)), jnp.asarray(s), None if z is None else jnp.asarray(z), codes


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("packing,n", [("i8", 8), ("u8", 8), ("u4x2", 8), ("u2x4", 8), ("u1x8", 16), ("u3", 16)])
def test_pack_roundtrip(packing, n):
    rng = np.random.default_rng(0)
    bits = {"i8": 8, "u8": 8, "u4x2": 4, "u2x4": 2, "u1x8": 1, "u3": 3}[packing]
    lo, hi = (-128, 128) if packing == "i8" else (0, 1 << bits)
    codes = rng.integers(lo, hi, (6, n))
    packed = ref.pack(codes, packing)
    assert packed.shape == (6, ref.packed_columns(packing, n))
    assert packed.nbytes * 8 == codes.size * bits  # really `bits` per code
    np.testing.assert_array_equal(ref.unpack(packed, packing, n), codes)
    np.testing.assert_array_equal(np.asarray(ref.unpack(jnp.asarray(packed), packing, n)), codes)


def test_u4x2_layout_is_column_halves():
    codes = np.arange(8, dtype=np.int64)[None] % 16
    packed = ref.pack(codes, "u4x2")
    np.testing.assert_array_equal(packed[0], [0 | 4 << 4, 1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4])


def test_dequantize_formula():
    rng = np.random.default_rng(1)
    packing, q, s, z, codes = make(rng, 64, 16, 4, 32, symmetric=False)
    want = (np.asarray(s, np.float32).repeat(32, 0) * codes.astype(np.float32)) + np.asarray(z, np.float32).repeat(32, 0)
    np.testing.assert_array_equal(np.asarray(ref.dequantize(q, s, z, bits=4, packing=packing, n=16)), want)
    packing, q, s, _, codes = make(rng, 64, 16, 4, 64, symmetric=True)
    want = np.asarray(s, np.float32) * (codes - 8).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ref.dequantize(q, s, None, bits=4, packing=packing, n=16)), want)


GPU_CASES = [  # m, k, n, bits, group (None: per channel), symmetric, dtype
    (1, 256, 128, 4, 64, False, jnp.float32),
    (1, 512, 256, 4, 128, True, jnp.bfloat16),
    (5, 256, 64, 8, None, True, jnp.float32),
    (16, 256, 128, 8, 32, False, jnp.bfloat16),
    (20, 128, 64, 4, None, False, jnp.float32),
    (40, 256, 128, 4, 128, False, jnp.bfloat16),
]


@pytest.mark.parametrize("m,k,n,bits,group,symmetric,dtype", GPU_CASES)
def test_gpu_kernel_interpret(m, k, n, bits, group, symmetric, dtype):
    rng = np.random.default_rng(m * 7 + k)
    packing, q, s, z, _ = make(rng, k, n, bits, group or k, symmetric)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    want = ref.qmatmul(x.astype(jnp.float32), q, s, z, bits=bits, packing=packing, n=n)
    got = gpu.qmatmul(x, q, s, z, bits=bits, packing=packing, n=n, out_dtype=jnp.float32, interpret=True)
    assert got.shape == (m, n)
    assert rel(got, want) < RTOL


def test_gpu_kernel_explicit_blocks_and_splits():
    rng = np.random.default_rng(3)
    packing, q, s, z, _ = make(rng, 512, 128, 4, 64, False)
    x = jnp.asarray(rng.normal(size=(3, 512)), jnp.float32)
    want = ref.qmatmul(x, q, s, z, bits=4, packing=packing, n=128)
    for b in (gpu.BlockSizes(block_n=16, k_splits=8), gpu.BlockSizes(block_n=32, k_splits=1, block_m=32)):
        got = gpu.qmatmul(x, q, s, z, bits=4, packing=packing, n=128, blocks=b, interpret=True)
        assert rel(got, want) < RTOL


def test_gpu_supported_reasons():
    assert gpu.supported(1, 576, 1536, "u4x2", 9, jnp.bfloat16) == ""  # SmolLM2 g64
    assert "packing" in gpu.supported(1, 256, 128, "u3", 4, jnp.bfloat16)
    assert gpu.supported(1, 96 * 3, 128, "u4x2", 3, jnp.bfloat16)  # group 96: not a power of two


@pytest.mark.parametrize("m,k,n,bits,group,symmetric,dtype", [
    (1, 512, 512, 4, 128, False, jnp.float32), (8, 1024, 256, 4, 256, True, jnp.float32),
    (3, 512, 256, 8, None, True, jnp.float32), (16, 256, 128, 8, 256, False, jnp.bfloat16)])
def test_tpu_kernel_interpret(m, k, n, bits, group, symmetric, dtype):
    rng = np.random.default_rng(m + k + n)
    packing, q, s, z, _ = make(rng, k, n, bits, group or k, symmetric)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    want = ref.qmatmul(x.astype(jnp.float32), q, s, z, bits=bits, packing=packing, n=n)
    got = tpu.qmatmul(x, q, s, z, bits=bits, packing=packing, n=n, out_dtype=jnp.float32, interpret=True)
    assert rel(got, want) < RTOL


@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_kernel_interpret(m):
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.normal(size=(m, 256)) * 3, jnp.float32)
    xq, sx = ref.quantize_rows_int8(x)
    wq = jnp.asarray(rng.integers(-127, 128, (256, 64)), jnp.int8)
    sw = jnp.asarray(rng.uniform(0.001, 0.01, (1, 64)), jnp.float32)
    want = ref.int8_matmul(xq, sx, wq, sw)
    got = gpu.int8_matmul(xq, sx, wq, sw, interpret=True)
    assert rel(got, want) < 1e-6
    # int32 accumulation is exact: compare against float64 math on the codes
    exact = (np.asarray(xq, np.float64) @ np.asarray(wq, np.float64)) * np.asarray(sx) * np.asarray(sw)
    assert rel(got, exact) < 1e-6


def test_api_leading_dims_grad_and_choice():
    rng = np.random.default_rng(5)
    packing, q, s, z, _ = make(rng, 128, 64, 4, 32, False)
    x = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.float32)
    kw = dict(bits=4, packing=packing, n=64)
    want = api.qmatmul(x, q, s, z, impl="xla", **kw)
    got = api.qmatmul(x, q, s, z, impl="interpret", **kw)
    assert got.shape == (2, 3, 64) and rel(got, want) < RTOL
    f = lambda impl: jax.grad(lambda x: jnp.sum(api.qmatmul(x, q, s, z, impl=impl, **kw) ** 2))(x)  # noqa: E731
    assert rel(f("interpret"), f("xla")) < 1e-5
    assert api.choose(1, 128, 64, packing, 4, jnp.float32) == "xla"  # CPU: no kernel
    with pytest.raises(ValueError, match="no Pallas kernel"):
        api.choose(1, 128, 64, packing, 4, jnp.float32, impl="pallas")


def _lower_cuda(fn, *args):
    exp = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    return exp.mlir_module()


def test_gpu_kernels_lower_to_triton():
    """The Triton lowering runs on CPU (cross-platform export): catches unsupported ops in CI."""
    S = jax.ShapeDtypeStruct
    txt = _lower_cuda(lambda x, q, s, z: gpu.qmatmul(x, q, s, z, bits=4, packing="u4x2", n=1024),
                      S((1, 2048), jnp.bfloat16), S((2048, 512), jnp.uint8), S((16, 1024), jnp.float16),
                      S((16, 1024), jnp.float16))
    assert "xla.gpu.triton" in txt
    _lower_cuda(lambda x, q, s: gpu.qmatmul(x, q, s, bits=8, packing="i8", n=512),
                S((64, 1024), jnp.bfloat16), S((1024, 512), jnp.int8), S((1, 512), jnp.float16))
    _lower_cuda(lambda a, b, c, d: gpu.int8_matmul(a, b, c, d), S((4, 256), jnp.int8), S((4, 1), jnp.float32),
                S((256, 128), jnp.int8), S((1, 128), jnp.float32))


def test_tpu_kernel_lowers_to_mosaic():
    S = jax.ShapeDtypeStruct
    exp = jax.export.export(jax.jit(lambda x, q, s, z: tpu.qmatmul(x, q, s, z, bits=4, packing="u4x2", n=1024)),
                            platforms=("tpu",))(S((8, 1024), jnp.bfloat16), S((1024, 512), jnp.uint8),
                                                S((8, 1024), jnp.float16), S((8, 1024), jnp.float16))
    assert "tpu_custom_call" in exp.mlir_module()


@pytest.mark.parametrize("m,dtype", [(1, jnp.bfloat16), (3, jnp.float32)])
def test_int8_gemv_route_interpret(m, dtype):
    """Per-column symmetric int8 (the w8 recipes, +emb8) through the decode GEMV kernel on int8 codes,
    ragged K and N: equals dequantize-then-dot up to summation order; gradients flow to x."""
    rng = np.random.default_rng(11)
    packing, q, s, _, _ = make(rng, 200, 72, 8, 200, True)
    x = jnp.asarray(rng.normal(size=(m, 200)), dtype)
    kw = dict(bits=8, packing=packing, n=72)
    # exact reference: fp32 dequantized weights (the XLA path would round them to bf16 for bf16 x first)
    w = ref.dequantize(q, s, None, dtype=jnp.float32, **kw)
    want = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    got = api.qmatmul(x, q, s, None, impl="interpret-gemv", out_dtype=jnp.float32, **kw)
    assert got.shape == (m, 72) and got.dtype == jnp.float32 and rel(got, want) < RTOL
    f = lambda impl: jax.grad(lambda x: jnp.sum(api.qmatmul(x, q, s, None, impl=impl, out_dtype=jnp.float32,  # noqa: E731
                                                            **kw) ** 2))(x.astype(jnp.float32))
    assert rel(f("interpret-gemv"), f("xla")) < 1e-5


def test_int8_gemv_route_choice(monkeypatch):
    """On a GPU `auto` sends one row of i8 per-column weights to the decode GEMV and everything else to XLA
    (the measured order, kernels/qmatmul/api.py); impl="pallas" runs our kernels: the GEMV route for
    what it fits, the qmatmul kernel for the rest; FLASHIT_JAX_GEMV_Q4=0 takes 4-bit rows off the GEMV."""
    from kernels.gemv import api as gemv_api

    monkeypatch.setattr(api, "_backend", lambda: "gpu")
    monkeypatch.setattr(gemv_api.jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("FLASHIT_JAX_GEMV_Q4", raising=False)
    assert api.choose(1, 2048, 8192, "i8", 1, jnp.bfloat16) == "gemv"
    for impl, kernel in (("auto", "xla"), ("pallas", "gpu")):
        assert api.choose(1, 2048, 8192, "i8", 16, jnp.bfloat16, impl) == kernel  # group scales
        assert api.choose(1, 2048, 8192, "u8", 1, jnp.bfloat16, impl, has_zeros=True) == kernel
        assert api.choose(4, 2048, 8192, "i8", 1, jnp.bfloat16, impl) == kernel  # verify-sized: GEMV auto takes 1 row
    assert api.choose(1, 2048, 8192, "u4x2", 16, jnp.bfloat16, has_zeros=True) == "gemv"  # W4 g128 under auto
    assert api.choose(1, 576, 1536, "u4x2", 9, jnp.bfloat16, has_zeros=True) == "gemv"  # group 64 ...
    assert api.choose(1, 576, 1536, "u4x2", 12, jnp.bfloat16, has_zeros=True) == "xla"  # ... not 48 (nor the kernel)
    monkeypatch.setenv("FLASHIT_JAX_GEMV_Q4", "0")
    assert api.choose(1, 2048, 8192, "u4x2", 16, jnp.bfloat16, has_zeros=True) == "xla"
    assert api.choose(1, 2048, 8192, "u4x2", 16, jnp.bfloat16, "pallas", has_zeros=True) == "gemv"
    with pytest.raises(ValueError, match="GEMV route takes symmetric int8"):
        api.choose(1, 128, 64, "u2x4", 2, jnp.float32, impl="interpret-gemv")


def test_int8_gemv_lowers_to_triton():
    S = jax.ShapeDtypeStruct
    from kernels.gemv import gpu as gemv_gpu

    from kernels.gemv import quant

    # both int-to-float conversions lower (the bit-pattern one uses a bitcast), and the prefetching loop
    for conv, pf in zip(gemv_gpu.CONVERTS, (False, True)):
        b = gemv_gpu.Blocks(convert=conv, prefetch=pf)
        txt = _lower_cuda(lambda x, q: gemv_gpu.matvec(x, q, blocks=b), S((1, 2048), jnp.bfloat16), S((2048, 8192), jnp.int8))
        assert "xla.gpu.triton" in txt
        txt = _lower_cuda(lambda x, q, s, z: quant.matvec_q4(x, q, s, z, n=8192, blocks=b), S((1, 2048), jnp.bfloat16),
                          S((2048, 4096), jnp.uint8), S((16, 8192), jnp.float16), S((16, 8192), jnp.float16))
        assert "xla.gpu.triton" in txt


@pytest.mark.parametrize("m,k,n,group,symmetric,dtype", [(1, 256, 96, 128, False, jnp.bfloat16),
                                                         (2, 192, 64, 64, True, jnp.float32),
                                                         (1, 200, 40, 200, True, jnp.float32)])
def test_int4_gemv_route_interpret(m, k, n, group, symmetric, dtype):
    """u4x2 codes (column halves), group scales and zeros, through the 4-bit decode GEMV (interpreted):
    equals the exact fp32 product of the dequantized weights; K splits and ragged N included."""
    rng = np.random.default_rng(k + n)
    packing, q, s, z, _ = make(rng, k, n, 4, group, symmetric)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    kw = dict(bits=4, packing=packing, n=n)
    w = ref.dequantize(q, s, z, dtype=jnp.float32, **kw)
    want = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    got = api.qmatmul(x, q, s, z, impl="interpret-gemv", out_dtype=jnp.float32, **kw)
    assert got.shape == (m, n) and rel(got, want) < RTOL
    from kernels.gemv import quant

    small = quant.matvec_q4(x, q, s, z, n=n, offset=ref.code_offset(packing, 4, z is not None),
                            blocks=quant.Blocks(bk=16, bn=16, target_programs=64), interpret=True)
    assert rel(small, want) < RTOL  # many K splits and column tiles
    plain = quant.matvec_q4(x, q, s, z, n=n, offset=ref.code_offset(packing, 4, z is not None),
                            blocks=quant.Blocks(bk=16, bn=16, target_programs=64, convert="cvt"), interpret=True)
    # the same codes either way; code * s + z may be contracted to one fma in one and not the other: 1 ulp
    assert rel(plain, small) < 1e-6


def _primitives_outside_kernels(jaxpr) -> collections.Counter:
    """Primitive names of a jaxpr and its sub-jaxprs (jit, custom_vjp, ...) with their counts, not looking
    inside Pallas kernels."""
    out = collections.Counter()
    for eqn in jaxpr.eqns:
        out[eqn.primitive.name] += 1
        if eqn.primitive.name == "pallas_call":
            continue
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _primitives_outside_kernels(inner)
    return out


@pytest.mark.parametrize("m,offset", [(1, 0.0), (2, 1.0)])
def test_int8_gemv_route_fuses_the_norm(m, offset):
    """linear(x, int8 QArray, norm=...) on the decode GEMV route runs the RMSNorm inside the kernel (no norm
    outside the Pallas call, as for bf16 weights): the value of normalise-then-qmatmul, and the gradients
    of x and the norm scale; on the XLA route it normalises first."""
    from flashit_jax.nn.linear import linear
    from flashit_jax.nn.norms import rms_norm
    from flashit_jax.nn.qarray import matmul_impl
    from flashit_jax.quant import RTN, quantize

    rng = np.random.default_rng(5 + m)
    w = quantize({"w": jnp.asarray(rng.normal(size=(200, 72)), jnp.float32)}, [(r"w", RTN(bits=8))])["w"]
    assert (w.packing, w.groups, w.zeros) == ("i8", 1, None)  # what the GEMV route serves
    x = jnp.asarray(3 * rng.normal(size=(m, 200)), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, 200), jnp.float32)

    def f(x, g):
        return linear(x, w, norm=(g, 1e-5, offset))

    def unfused(x, g):
        return linear(rms_norm(x, g, 1e-5, offset), w)

    with matmul_impl("interpret-gemv"):
        prims = _primitives_outside_kernels(jax.make_jaxpr(f)(x, g).jaxpr)
        assert "pallas_call" in prims and "rsqrt" not in prims
        got = f(x, g)
        want = unfused(x, g)
        assert rel(got, want) < 1e-5
        loss = lambda fn: jax.grad(lambda x, g: jnp.sum(fn(x, g) ** 2), argnums=(0, 1))(x, g)  # noqa: E731
        for a, b in zip(loss(f), loss(unfused)):
            assert rel(a, b) < 1e-4
    with matmul_impl("xla"):  # (a new function: make_jaxpr's trace cache does not key on matmul_impl)
        prims = _primitives_outside_kernels(jax.make_jaxpr(lambda x, g: f(x, g))(x, g).jaxpr)
        assert "pallas_call" not in prims and "rsqrt" in prims
        assert rel(f(x, g), want) < 1e-5


@pytest.mark.parametrize("recipe", [None, "w8+emb8", "w4g32-asym"])
def test_decode_step_fuses_norms_activation_and_residual_adds(monkeypatch, recipe):
    """A bf16 decode step of the fused layout (q|k|v, gate|up) through the GEMV kernels (interpreted, K splits
    summed in the kernel): no layer's RMSNorm or SiLU left outside the kernels (the final norm before the
    tied head stays), for bf16 weights and for the int8 (`w8+emb8`) and 4-bit (`w4g32-asym`) routes, and the
    logits of the unfused XLA step (bf16: within a few bf16 roundings)."""
    from flashit_jax.nn.qarray import matmul_impl
    from flashit_jax.quant import named_recipe, quantize
    from models import Model
    from models.llama import LlamaConfig, fuse_projections

    cfg = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, tie_embeddings=True)
    m = Model(cfg)
    p = fuse_projections(m.init_params(jax.random.key(0), jnp.bfloat16), cfg)
    if recipe:
        p = quantize(p, named_recipe(recipe))
    cache = m.init_cache(1, 8, jnp.bfloat16, params=p)
    monkeypatch.setenv("FLASHIT_JAX_GEMV", "0")
    _, cache, _ = m.forward(p, jnp.array([[5, 17, 100]]), cache=cache)
    tok = jnp.array([[42]])
    want = m.forward(p, tok, cache=cache)[0]
    monkeypatch.setenv("FLASHIT_JAX_GEMV", "interpret")
    monkeypatch.setenv("FLASHIT_JAX_GEMV_FIXUP", "1")

    def step(p, c):  # int8 weights take the GEMV route through qarray.matmul_impl (interpreted here)
        with matmul_impl("interpret-gemv" if recipe else "auto"):
            return m.forward(p, tok, cache=c)[0]

    prims = _primitives_outside_kernels(jax.make_jaxpr(step)(p, cache).jaxpr)
    assert prims["pallas_call"] >= 4 * cfg.n_layers and prims["rsqrt"] == 1 and prims["logistic"] == 0, prims
    monkeypatch.setenv("FLASHIT_JAX_GEMV", "0")
    unfused = _primitives_outside_kernels(jax.make_jaxpr(lambda p, c: m.forward(p, tok, cache=c)[0])(p, cache).jaxpr)
    assert unfused["rsqrt"] == 1 + 2 * cfg.n_layers and unfused["logistic"] == cfg.n_layers  # what was fused
    monkeypatch.setenv("FLASHIT_JAX_GEMV", "interpret")
    got = step(p, cache)
    assert rel(got, want) < 2e-2  # bf16 logits of two programs that round at different points
    assert int(jnp.argmax(got)) == int(jnp.argmax(want))
