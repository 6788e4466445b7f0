"""The decode GEMV kernels (Pallas, interpret mode on CPU) against XLA matmuls."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax.nn.norms import rms_norm
from kernels.gemv import gpu, reference

# fp32 sums of K products in a different order: relative error ~ sqrt(K) * 2^-24
SHAPES = [(1, 576, 192), (1, 576, 1536), (1, 1536, 576), (3, 200, 300), (8, 64, 1000), (1, 2048, 100)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)])
def test_matvec(m, k, n, dtype, tol):
    rng = np.random.default_rng(k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    got = gpu.matvec(x, w, blocks=gpu.Blocks(target_programs=16), interpret=True)
    want = reference.matvec(x, w)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < tol  # both accumulate bf16 products exactly in fp32: only the order differs


@pytest.mark.parametrize("m,k,n", [(1, 576, 192), (3, 200, 300), (1, 2048, 100)])
def test_matvec_prefetch(m, k, n):
    """The next tile's load carried across the loop: the same sums (ragged K, several K splits, the
    last step's prefetch fully masked), for bf16 weights and int8 codes."""
    rng = np.random.default_rng(k * n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    for w in (jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)):
        b = gpu.Blocks(bk=32, bn=64, target_programs=24)
        plain = gpu.matvec(x, w, blocks=b, interpret=True)
        got = gpu.matvec(x, w, blocks=dataclasses.replace(b, prefetch=True), interpret=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))  # same products, same order
        want = reference.matvec(x, w.astype(jnp.bfloat16))
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5


@pytest.mark.parametrize("m,d,v", [(1, 576, 1000), (2, 100, 70), (1, 64, 4097)])
def test_matvec_t(m, d, v):
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
    e = jnp.asarray(rng.standard_normal((v, d)), jnp.bfloat16)
    got = gpu.matvec_t(x, e, interpret=True)
    want = reference.matvec_t(x, e)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert got.shape == (m, v) and rel < 1e-5


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: 22 s on 2 cores
def test_model_logits_through_the_kernel(monkeypatch, fused):
    """A decode step through nn.linear/unembed with the kernel equals the XLA path, and its grads."""
    from models import Model
    from models.configs import SHAPES as _  # noqa: F401  (registers shapes)
    from models.llama import LlamaConfig

    from models.llama import fuse_projections

    cfg = LlamaConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, tie_embeddings=True,
                      norm_offset=float(fused))
    m = Model(cfg)
    p = m.init_params(jax.random.key(0))
    if fused:  # q|k|v and gate|up: the attention and MLP norms run inside the GEMV (with Gemma's offset)
        p = fuse_projections(p, cfg)
    toks = jnp.asarray([[5], [9]], jnp.int32)
    monkeypatch.setenv("FLASHIT_JAX_GEMV", "0")
    want = m.forward(p, toks)[0]
    gw = jax.grad(lambda p: m.forward(p, toks)[0].sum())(p)
    monkeypatch.setenv("FLASHIT_JAX_GEMV", "interpret")
    got = m.forward(p, toks)[0]
    gg = jax.grad(lambda p: m.forward(p, toks)[0].sum())(p)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gg["embed"]["w"]), np.asarray(gw["embed"]["w"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gg["layers"][1]["mlp"]["down"]["w"]),
                               np.asarray(gw["layers"][1]["mlp"]["down"]["w"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gg["layers"][0]["mlp_norm"]["scale"]),
                               np.asarray(gw["layers"][0]["mlp_norm"]["scale"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m,k,n,offset", [(1, 576, 960, 0.0), (2, 200, 130, 1.0), (1, 2048, 64, 0.0)])
def test_matvec_norm(m, k, n, offset):
    """The kernel's in-prologue RMSNorm equals nn.rms_norm followed by the product (bf16 inputs:
    the normalised values are rounded to bf16 on both paths, so only the fp32 sum order differs)."""
    rng = np.random.default_rng(k)
    x = jnp.asarray(3 * rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    s = jnp.asarray(rng.standard_normal(k), jnp.bfloat16)
    got = gpu.matvec(x, w, blocks=gpu.Blocks(bk=64, target_programs=16), norm_scale=s, eps=1e-6, offset=offset,
                     interpret=True)
    want = reference.matvec(rms_norm(x, s, 1e-6, offset), w)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 1e-4, rel  # a bf16 rounding of a normalised value may flip (~2^-9 on one entry)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernels for real")
@pytest.mark.parametrize("m,k,n", SHAPES + [(1, 2048, 16384), (1, 8192, 2048)])
def test_matvec_on_gpu(m, k, n):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    want = reference.matvec(x, w)
    rel = float(jnp.linalg.norm(gpu.matvec(x, w) - want) / jnp.linalg.norm(want))
    assert rel < 1e-5
    e = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    want_t = reference.matvec_t(x, e)
    assert float(jnp.linalg.norm(gpu.matvec_t(x, e) - want_t) / jnp.linalg.norm(want_t)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the atomics of the in-kernel split sum for real")
@pytest.mark.parametrize("k,n,fmt", [(2048, 3072, "bf16"), (8192, 2048, "i8"), (2048, 16384, "i8"), (2048, 4096, "u4")])
def test_matvec_fixup_on_gpu(k, n, fmt):
    """Blocks.fixup with programs really running concurrently (interpret mode runs them one after another):
    every one of 20 calls gives the same bits (the last split adds the partials in split order) and the
    value of XLA's sum of the partials."""
    from kernels.gemv.quant import matvec_q4

    rng = np.random.default_rng(k + n)
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
    b = gpu.Blocks(bk=64, bn=128, target_programs=2112)
    if fmt == "u4":
        q = jnp.asarray(rng.integers(0, 256, (k, n // 2)), jnp.uint8)
        s = jnp.asarray(rng.uniform(0.01, 0.02, (k // 128, n)), jnp.float16)
        run = lambda blocks: matvec_q4(x, q, s, n=n, blocks=blocks)  # noqa: E731
    else:
        w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8) if fmt == "i8" else \
            jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        run = lambda blocks: gpu.matvec(x, w, blocks=blocks)  # noqa: E731
    want = np.asarray(run(b))
    got = [np.asarray(run(dataclasses.replace(b, fixup=True))) for _ in range(20)]
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_tuned_blocks_are_correct():
    """Every entry of tuned.json is a valid Blocks, and those blocks compute the product (on a
    K and N cut down so interpret mode stays quick: the masking paths are the same)."""
    import json

    kinds = list(json.loads(gpu.TUNED_FILE.read_text())["devices"])
    assert kinds, "kernels/gemv/tuned.json has no device table"
    assert gpu.tuned() == gpu.tuned(kinds[0])  # this CPU has no table: the first one serves
    entries = {}
    for kind in kinds:
        table = gpu.tuned(kind)
        assert table, f"kernels/gemv/tuned.json: empty table for {kind}"
        entries.update({(kk, b): None for kk, b in table.items()})
    for ((fmt, k, n), b) in entries:
        assert b.bk >= 16 and b.bn >= 16
        assert fmt in ("bf16", "i8", "t") or fmt.startswith("u4g"), fmt
        kk, nn = min(k, 2 * b.bk + 3), min(n, 3 * b.bn + 5)  # ragged edges in both axes
        rng = np.random.default_rng(kk * nn)
        x = jnp.asarray(rng.standard_normal((1, kk)), jnp.bfloat16)
        # u4 blocks run the 4-bit kernel, tested with its packing in tests/test_quant.py and tests/kernels; here their tile
        # shapes compute a plain product (same plan and masks)
        w = jnp.asarray(rng.standard_normal((kk, nn)) * (40 if fmt == "i8" else 1), jnp.int8 if fmt == "i8" else jnp.bfloat16)
        got = gpu.matvec(x, w, blocks=b, interpret=True)
        want = reference.matvec(x, w.astype(jnp.bfloat16))
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5, (fmt, k, n, b)
    fmt0, k0, n0 = next(iter(gpu.tuned()))
    assert gpu.blocks_for(k0, n0, fmt0) == gpu.tuned()[(fmt0, k0, n0)]
    assert gpu.blocks_for(3, 5) == gpu.Blocks()
    assert gpu.blocks_for(3, 5, "i8", gpu.Blocks(bk=32)) == gpu.Blocks(bk=32)


def test_int_to_f32_is_exact():
    """The bit-pattern conversion gives every int8 code and every nibble/byte value exactly, offsets too."""
    i8 = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8)
    u = jnp.arange(0, 256, dtype=jnp.int32)
    for v in (i8, u):
        for off in (0, 8, 128):
            want = np.asarray(v, np.float64) - off
            for conv in gpu.CONVERTS:
                got = gpu.int_to_f32(v, offset=off, convert=conv)
                assert got.dtype == jnp.float32
                np.testing.assert_array_equal(np.asarray(got, np.float64), want)
    with pytest.raises(ValueError, match="convert must be one of"):
        gpu.int_to_f32(u, convert="fast")


@pytest.mark.parametrize("m,k,n", [(1, 300, 200), (2, 64, 1000)])
def test_int8_matvec_converts_agree(m, k, n):
    """int8 codes through the kernel with either conversion: the same fp32 result, equal to the exact product."""
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    want = reference.matvec(x, w.astype(jnp.bfloat16))
    got = {c: gpu.matvec(x, w, blocks=gpu.Blocks(target_programs=16, convert=c), interpret=True) for c in gpu.CONVERTS}
    np.testing.assert_array_equal(np.asarray(got["magic"]), np.asarray(got["cvt"]))
    assert float(jnp.linalg.norm(got["magic"] - want) / jnp.linalg.norm(want)) < 1e-5


def test_bad_input(tmp_path, monkeypatch):
    x = jnp.ones((1, 8), jnp.float32)
    with pytest.raises(ValueError, match="w is"):
        gpu.matvec(x, jnp.ones((9, 4), jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="norm_scale has shape"):
        gpu.matvec(x, jnp.ones((8, 4), jnp.float32), norm_scale=jnp.ones(5, jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="Blocks.convert must be one of"):
        gpu.matvec(x, jnp.ones((8, 4), jnp.int8), blocks=gpu.Blocks(convert="i2f"), interpret=True)
    bad = tmp_path / "tuned.json"
    bad.write_text("{bad")
    monkeypatch.setattr(gpu, "TUNED_FILE", bad)
    gpu.tuned.cache_clear()
    try:
        with pytest.raises(ValueError, match="tuned.json is corrupt"):
            gpu.tuned()
    finally:
        monkeypatch.undo()
        gpu.tuned.cache_clear()


# the in-kernel sum is opt-in (slower on GPUs, docs/quantization.md): two shapes in the default run
@pytest.mark.parametrize("m,k,n,bk,bn,programs", [pytest.param(1, 576, 200, 64, 64, 1, marks=pytest.mark.slow),
                                                  (1, 576, 200, 64, 64, 40), (3, 200, 300, 32, 64, 64),
                                                  pytest.param(2, 2048, 100, 128, 32, 128, marks=pytest.mark.slow)])
def test_matvec_fixup(m, k, n, bk, bn, programs):
    """K splits summed in the kernel (Blocks.fixup: per-column counters, the last split adds the partials)
    against XLA's sum of the same partials: bf16 weights and int8 codes with a per-column scale and a
    bf16 output, the norm prologue on, ragged N (a partial column tile), one split and several."""
    rng = np.random.default_rng(k + n + m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.bfloat16)
    b = gpu.Blocks(bk=bk, bn=bn, target_programs=programs)
    splits = gpu._plan(b, m, k, n, gpu._pow2_at_most(k))[-1]
    assert (splits == 1) == (programs == 1)
    for w, scale in ((jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), None),
                     (jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8),
                      jnp.asarray(rng.uniform(0.01, 0.02, n), jnp.float32))):
        for out_dtype in (jnp.float32, jnp.bfloat16):
            kw = dict(norm_scale=g, out_scale=scale, out_dtype=out_dtype, interpret=True)
            plain = gpu.matvec(x, w, blocks=b, **kw)
            got = gpu.matvec(x, w, blocks=dataclasses.replace(b, fixup=True), **kw)
            assert got.dtype == out_dtype and got.shape == (m, n)
            want = reference.matvec(rms_norm(x, g, 1e-5, 0.0), w.astype(jnp.bfloat16))
            want = want if scale is None else want * scale
            got32, plain32 = np.asarray(got, np.float32), np.asarray(plain, np.float32)
            if out_dtype == jnp.float32:  # the same partials, added in another order: fp32 rounding only
                assert float(np.linalg.norm(got32 - want) / np.linalg.norm(want)) < 1e-5
                np.testing.assert_allclose(got32, plain32, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
            else:  # one bf16 rounding of (nearly) the same value: at most one ulp apart
                np.testing.assert_allclose(got32, plain32, rtol=2 ** -7, atol=0)


def test_matvec_fixup_switch(monkeypatch):
    """FLASHIT_JAX_GEMV_FIXUP=1/0 forces the in-kernel split sum on or off (benchmarks A/B it), read
    outside the jit so a flip traces a new program; anything else is an error naming the variable."""
    x = jnp.ones((1, 256), jnp.bfloat16)
    w = jnp.ones((256, 64), jnp.bfloat16)
    b = gpu.Blocks(bk=32, bn=32, target_programs=16)

    def kernels():
        text = str(jax.make_jaxpr(lambda x, w: gpu.matvec(x, w, blocks=b, interpret=True))(x, w))
        return "flashit_matvec_fixup" in text

    monkeypatch.delenv("FLASHIT_JAX_GEMV_FIXUP", raising=False)
    assert not kernels()
    monkeypatch.setenv("FLASHIT_JAX_GEMV_FIXUP", "1")
    assert kernels()
    np.testing.assert_array_equal(np.asarray(gpu.matvec(x, w, blocks=b, interpret=True)), 256.0)
    monkeypatch.setenv("FLASHIT_JAX_GEMV_FIXUP", "yes")
    with pytest.raises(ValueError, match="FLASHIT_JAX_GEMV_FIXUP must be 0 or 1"):
        gpu.matvec(x, w, blocks=b, interpret=True)


def test_matvec_fixup_lowers_to_triton():
    """The in-kernel split sum (atomics, aliased counters), the norm, gate and residual fusions pass the
    Triton lowering on CPU."""
    S = jax.ShapeDtypeStruct
    b = gpu.Blocks(bk=64, bn=128, target_programs=528, fixup=True)
    exp = jax.export.export(
        jax.jit(lambda x, w, g, s: gpu.matvec(x, w, blocks=b, norm_scale=g, out_scale=s, out_dtype=jnp.bfloat16)),
        platforms=("cuda",), disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((1, 2048), jnp.bfloat16), S((2048, 3000), jnp.int8), S((2048,), jnp.bfloat16), S((3000,), jnp.float32))
    text = exp.mlir_module()
    assert "xla.gpu.triton" in text and "output_operand_alias" in text
    from kernels.gemv.quant import matvec_q4

    exp = jax.export.export(
        jax.jit(lambda x, q, s, g: matvec_q4(x, q, s, n=4096, blocks=b, out_dtype=jnp.bfloat16, norm_scale=g)),
        platforms=("cuda",), disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((1, 2048), jnp.bfloat16), S((2048, 2048), jnp.uint8), S((16, 4096), jnp.float16), S((2048,), jnp.bfloat16))
    assert "output_operand_alias" in exp.mlir_module()
    # the down projection's fusions: silu(gate) * up in the prologue, the residual add in the epilogue
    for fn, w in ((lambda x, w, r: gpu.matvec(x, w, blocks=b, glu="silu", residual=r, out_dtype=jnp.bfloat16),
                   S((8192, 2048), jnp.bfloat16)),
                  (lambda x, w, r: matvec_q4(x, w, jnp.ones((64, 2048), jnp.float16), n=2048, blocks=b, glu="silu",
                                             residual=r, out_dtype=jnp.bfloat16), S((8192, 1024), jnp.uint8))):
        jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            S((1, 16384), jnp.bfloat16), w, S((1, 2048), jnp.bfloat16))


@pytest.mark.parametrize("m,k,n,group,zeros", [(1, 256, 96, 64, True), (2, 512, 200, 128, False)])
def test_matvec_q4_fixup(m, k, n, group, zeros):
    """The 4-bit GEMV with its K splits summed in the kernel (two column halves, each with its own counters)
    equals XLA's sum of the same partials."""
    from kernels.gemv.quant import matvec_q4

    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    q = jnp.asarray(rng.integers(0, 256, (k, n // 2)), jnp.uint8)
    s = jnp.asarray(rng.uniform(0.01, 0.02, (k // group, n)), jnp.float16)
    z = jnp.asarray(rng.uniform(-0.1, 0.1, (k // group, n)), jnp.float16) if zeros else None
    b = gpu.Blocks(bk=32, bn=32, target_programs=48)
    assert gpu._plan(b, m, k, n // 2, group)[-1] > 1
    plain = matvec_q4(x, q, s, z, n=n, blocks=b, interpret=True)
    got = matvec_q4(x, q, s, z, n=n, blocks=dataclasses.replace(b, fixup=True), interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), rtol=1e-5, atol=1e-5 * float(jnp.abs(plain).max()))
    bf = matvec_q4(x, q, s, z, n=n, blocks=dataclasses.replace(b, fixup=True), interpret=True, out_dtype=jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(bf, np.float32), np.asarray(plain), rtol=2 ** -7)


@pytest.mark.parametrize("fixup", [False, True])
@pytest.mark.parametrize("m,k,n,dtype", [(1, 576, 200, jnp.bfloat16), (2, 200, 96, jnp.float32)])
def test_matvec_glu_and_residual(m, k, n, dtype, fixup):
    """glu="silu" (x = gate | up, the product of silu(gate) * up) and residual (residual + y) inside the GEMV:
    the values of `residual + (jax.nn.silu(g) * u) @ w`, computed in the same dtype, for bf16 weights and int8
    codes with a per-column scale, the K splits summed by XLA or in the kernel."""
    rng = np.random.default_rng(k + m)
    gu = jnp.asarray(2 * rng.standard_normal((m, 2 * k)), dtype)
    res = jnp.asarray(rng.standard_normal((m, n)), dtype)
    b = gpu.Blocks(bk=32, bn=64, target_programs=24, fixup=fixup)
    for w, scale in ((jnp.asarray(rng.standard_normal((k, n)) / 8, dtype), None),
                     (jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8), jnp.asarray(rng.uniform(1e-3, 2e-3, n), jnp.float32))):
        got = gpu.matvec(gu, w, blocks=b, glu="silu", residual=res, out_scale=scale, out_dtype=dtype, interpret=True)
        a = jax.nn.silu(gu[:, :k]) * gu[:, k:]
        y = reference.matvec(a, w.astype(dtype))
        want = res + (y if scale is None else y * scale).astype(dtype)
        assert got.dtype == dtype and got.shape == (m, n)
        err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max()
        # fp32: sum order only; bf16: the sum's order can flip the rounding of y, then of the add (2 ulps)
        tol = 1e-5 if dtype == jnp.float32 else 2 * 2 ** -8
        assert err <= tol * float(np.abs(np.asarray(want, np.float32)).max()), err


def test_matvec_glu_bad_input():
    x = jnp.ones((1, 16), jnp.float32)
    with pytest.raises(ValueError, match="glu must be one of"):
        gpu.matvec(x, jnp.ones((8, 4), jnp.float32), glu="relu", interpret=True)
    with pytest.raises(ValueError, match=r"takes x as \[M, 2K\]"):
        gpu.matvec(x, jnp.ones((16, 4), jnp.float32), glu="silu", interpret=True)
    with pytest.raises(ValueError, match="do not combine"):
        gpu.matvec(x, jnp.ones((8, 4), jnp.float32), glu="silu", norm_scale=jnp.ones(8), interpret=True)
    with pytest.raises(ValueError, match="residual has shape"):
        gpu.matvec(x, jnp.ones((16, 4), jnp.float32), residual=jnp.ones((1, 5)), interpret=True)


@pytest.mark.parametrize("fixup", [False, True])
def test_matvec_q4_fusions(fixup):
    """The 4-bit GEMV's prologue and epilogue fusions (the same helpers as the bf16/int8 kernel's): the norm,
    then silu(gate) * up with a residual add, against the XLA expressions on the dequantized weight."""
    from kernels.gemv.quant import matvec_q4
    from kernels.qmatmul.reference import dequantize

    rng = np.random.default_rng(3)
    k, n, group = 256, 96, 64
    q = jnp.asarray(rng.integers(0, 256, (k, n // 2)), jnp.uint8)
    s = jnp.asarray(rng.uniform(0.01, 0.02, (k // group, n)), jnp.float16)
    w = dequantize(q, s, None, bits=4, packing="u4x2", n=n, dtype=jnp.float32)  # the kernel's fp32 weights
    hi = jax.lax.Precision.HIGHEST
    b = gpu.Blocks(bk=32, bn=32, target_programs=24, fixup=fixup)
    x = jnp.asarray(2 * rng.standard_normal((1, k)), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.bfloat16)
    got = matvec_q4(x, q, s, n=n, blocks=b, norm_scale=g, eps=1e-6, out_dtype=jnp.float32, interpret=True)
    want = jnp.dot(rms_norm(x, g, 1e-6, 0.0).astype(jnp.float32), w, precision=hi)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
    gu = jnp.asarray(2 * rng.standard_normal((1, 2 * k)), jnp.bfloat16)
    res = jnp.asarray(rng.standard_normal((1, n)), jnp.bfloat16)
    got = matvec_q4(gu, q, s, n=n, blocks=b, glu="silu", residual=res, out_dtype=jnp.bfloat16, interpret=True)
    want = res + jnp.dot((jax.nn.silu(gu[:, :k]) * gu[:, k:]).astype(jnp.float32), w, precision=hi).astype(jnp.bfloat16)
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max()
    assert err <= 2 * 2 ** -8 * float(np.abs(np.asarray(want, np.float32)).max()), err
