"""Selective scan: every implementation against the sequential lax.scan reference, outputs and
gradients of x, Δ, A, B, C, D and the initial state; Pallas kernels in interpret mode on CPU.

Tolerances: fp32 kernels differ from the reference only in summation order (error grows with
L·N terms of eps 6e-8): 1e-4 of the largest reference value. bf16 inputs are upcast by every
implementation, so outputs differ by the last bf16 rounding of y and the gradients (2^-8):
1e-2 of the largest value.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssm_scan import GpuBlocks, TpuBlocks, reference, selective_scan, step


def _inputs(layout, bt, l, n, dtype, seed=0, d=48, heads=4, groups=2, p=8):
    k = jax.random.split(jax.random.key(seed), 8)
    if layout == "mamba1":
        shape_x, shape_dt, shape_a, shape_bc, shape_d, shape_h = (bt, l, d), (bt, l, d), (d, n), (bt, l, n), (d,), \
            (bt, d, n)
    else:
        shape_x, shape_dt, shape_a, shape_bc, shape_d, shape_h = (bt, l, heads, p), (bt, l, heads), (heads,), \
            (bt, l, groups, n), (heads,), (bt, heads, p, n)
    x = jax.random.normal(k[0], shape_x).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], shape_dt) - 1.0).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(k[2], shape_a))
    B = jax.random.normal(k[3], shape_bc).astype(dtype)
    C = jax.random.normal(k[4], shape_bc).astype(dtype)
    D = jax.random.normal(k[5], shape_d)
    h0 = jax.random.normal(k[6], shape_h)
    return x, dt, A, B, C, D, h0


def _run(impl, blocks=None, interpret=True):
    def f(x, dt, A, B, C, D, h0):
        return selective_scan(x, dt, A, B, C, D, initial_state=h0, return_final_state=True, impl=impl, blocks=blocks,
                              interpret=interpret and impl.startswith("pallas"), chunk=8)
    return f


def _loss(fn, wy, wh):
    def loss(*args):
        y, h = fn(*args)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh)
    return loss


def _close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), what
    tol = (1e-2 if dtype == jnp.bfloat16 else 1e-4) * max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def check(impl, layout, l, n, dtype, blocks=None, bt=2, interpret=True):
    args = _inputs(layout, bt, l, n, dtype)
    want_y, want_h = _run("reference")(*args)
    got_y, got_h = jax.jit(_run(impl, blocks, interpret))(*args)
    assert got_y.dtype == args[0].dtype and got_y.shape == args[0].shape
    _close(got_y, want_y, dtype, f"{impl} y")
    _close(got_h, want_h, jnp.float32 if dtype == jnp.float32 else dtype, f"{impl} final state")
    kw, kh = jax.random.split(jax.random.key(7))
    wy, wh = jax.random.normal(kw, want_y.shape), jax.random.normal(kh, want_h.shape)
    want_g = jax.grad(_loss(_run("reference"), wy, wh), argnums=range(7))(*args)
    got_g = jax.jit(jax.grad(_loss(_run(impl, blocks, interpret), wy, wh), argnums=range(7)))(*args)
    for name, g, w in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), got_g, want_g):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        _close(g, w, dtype, f"{impl} d{name}")


# small blocks so that the tiny shapes still span several programs, chunks and time blocks
GPU_SMALL = GpuBlocks(block_p=16, chunk=4)
TPU_SMALL = TpuBlocks(block_p=128, time_block=8, chunk=4)
KERNELS = [("pallas_gpu", GPU_SMALL), ("pallas_tpu", TPU_SMALL)]


_SMALL_CASES = [("mamba1", 13, 16, jnp.float32), ("multihead", 11, 8, jnp.bfloat16)]


# the sequential GPU kernel's multi-head case (47 s on the CI machine) runs in the slow set: the default run checks
# that layout through the chunk-parallel variants below
@pytest.mark.parametrize("impl,blocks,layout,l,n,dtype", [
    pytest.param(*k, *c, id=f"{c[0]}-L{c[1]}-N{c[2]}-{'fp32' if c[3] == jnp.float32 else 'bf16'}-{name}",
                 marks=[pytest.mark.slow] if (name, c[0]) == ("gpu", "multihead") else [])
    for c in _SMALL_CASES for k, name in zip(KERNELS, ["gpu", "tpu"])])
def test_pallas_matches_reference(impl, blocks, layout, l, n, dtype):
    check(impl, layout, l, n, dtype, blocks)


# the chunk-parallel family in the default run (the split-tile default itself in test_gpu_default_blocks); the
# sequential kernel's prefetch and tile variants and the plainer parallel ones in the slow run (its segmented default
# runs in test_pallas_matches_reference; CI's default run is kept under 15 minutes)
@pytest.mark.parametrize("blocks", [pytest.param(GpuBlocks(block_p=16, chunk=4, prefetch=True, segments=1),
                                                 marks=pytest.mark.slow),
                                    pytest.param(GpuBlocks(block_p=16, chunk=4, prefetch=True, segments=3),
                                                 marks=pytest.mark.slow),
                                    pytest.param(GpuBlocks(block_p=16, chunk=4, segments=3, tile=True),
                                                 marks=pytest.mark.slow),
                                    pytest.param(GpuBlocks(block_p=16, chunk=4, segments=1, parallel=True),
                                                 marks=pytest.mark.slow),
                                    pytest.param(GpuBlocks(block_p=8, chunk=8, segments=3, parallel=True),
                                                 marks=pytest.mark.slow),
                                    GpuBlocks(block_p=8, chunk=8, bwd_chunk=2, bwd_block_p=16, segments=2,
                                              parallel=True),
                                    pytest.param(GpuBlocks(block_p=16, chunk=4, segments=1, parallel=True,
                                                           carry_in=False), marks=pytest.mark.slow),
                                    pytest.param(GpuBlocks(block_p=8, chunk=8, bwd_chunk=4, segments=1, parallel=True,
                                                           prefetch=True), marks=pytest.mark.slow),
                                    # split tiles: N_l = 4 lanes (mamba1, N 16 and 8), the multi-head layout's
                                    # P = 8 over 2 warps leaves 4 lanes x 8 > N = 8: split off there
                                    pytest.param(GpuBlocks(block_p=16, chunk=4, num_warps=2, segments=1, parallel=True,
                                                           split_n=True), marks=pytest.mark.slow),
                                    pytest.param(GpuBlocks(block_p=8, chunk=8, num_warps=1, segments=2, parallel=True,
                                                           split_n=True, unroll=2, prefetch=True),
                                                 marks=pytest.mark.slow)],
                         ids=["prefetch", "prefetch-segments3", "tile-segments3", "parallel", "parallel-segments3",
                              "parallel-bwdchunk2-bwdblock16-segments2", "parallel-summed-carry",
                              "parallel-prefetch-bwdchunk4", "parallel-split", "parallel-split-unroll2-segments2"])
@pytest.mark.parametrize("layout,l,n,dtype", [("mamba1", 29, 16, jnp.float32), ("multihead", 11, 8, jnp.bfloat16)],
                         ids=["mamba1-L29-N16-fp32", "multihead-L11-N8-bf16"])
def test_gpu_pipelined_variants_match_reference(blocks, layout, l, n, dtype):
    """The forward variants the GPU benchmark sweeps: values, final state and (through the
    checkpoints they store for the backward) gradients, with the initial state given."""
    check("pallas_gpu", layout, l, n, dtype, blocks)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("impl,blocks", KERNELS, ids=["gpu", "tpu"])
@pytest.mark.parametrize("layout", ["mamba1", "multihead"])
@pytest.mark.parametrize("l", [1, 37, 300])
@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_pallas_sweep(impl, blocks, layout, l, n, dtype):
    check(impl, layout, l, n, dtype, blocks)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernels for real")
@pytest.mark.parametrize("layout,l,n,dtype", [("mamba1", 37, 16, jnp.bfloat16), ("mamba1", 300, 16, jnp.float32),
                                              ("mamba1", 37, 8, jnp.float32), ("mamba1", 45, 2, jnp.float32),
                                              ("multihead", 77, 16, jnp.bfloat16)])
def test_default_blocks_on_gpu(layout, l, n, dtype):
    """The GPU default (split tiles for N = 16 and 8, [T, N, P] tiles for N = 2) compiled for real: values, final
    state and gradients, L not a multiple of the chunk (37, 45, 77: odd chunk counts, so the unrolled loop's last
    chunk runs after it)."""
    check("pallas_gpu", layout, l, n, dtype, bt=2, interpret=False)


@pytest.mark.slow
@pytest.mark.parametrize("impl,blocks", [("pallas_gpu", GpuBlocks()), ("pallas_tpu", TpuBlocks()),
                                         ("pallas_gpu", GpuBlocks(batch_stores=True))],
                         ids=["gpu", "tpu", "gpu-batch-stores"])
def test_pallas_default_blocks(impl, blocks):
    check(impl, "mamba1", 300, 16, jnp.float32, blocks, bt=1)


@pytest.mark.parametrize("impl", ["xla", "associative"])
@pytest.mark.parametrize("layout", ["mamba1", "multihead"])
def test_xla_variants_match_reference(impl, layout):
    check(impl, layout, 21, 16, jnp.float32)


def test_step_is_one_scan_step():
    for layout in ("mamba1", "multihead"):
        x, dt, A, B, C, D, h0 = _inputs(layout, 2, 1, 8, jnp.float32, seed=3)
        want_y, want_h = selective_scan(x, dt, A, B, C, D, initial_state=h0, return_final_state=True,
                                        impl="reference")
        y, h = step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
        np.testing.assert_allclose(y, want_y[:, 0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(h, want_h, rtol=1e-6, atol=1e-6)


def test_zero_dt_freezes_state():
    """Δ = 0 past a row's length (right padding) leaves the state as it was."""
    x, dt, A, B, C, D, h0 = _inputs("mamba1", 1, 9, 8, jnp.float32, seed=4)
    _, h5 = selective_scan(x[:, :5], dt[:, :5], A, B[:, :5], C[:, :5], D, initial_state=h0, return_final_state=True)
    dt = dt.at[:, 5:].set(0.0)
    _, h9 = selective_scan(x, dt, A, B, C, D, initial_state=h0, return_final_state=True)
    np.testing.assert_allclose(h9, h5, rtol=1e-6, atol=1e-6)


def test_bad_input():
    x, dt, A, B, C, D, _ = _inputs("mamba1", 2, 5, 8, jnp.float32)
    with pytest.raises(ValueError, match="state size mismatch"):
        selective_scan(x, dt, A, B[..., :4], C[..., :4], D)
    with pytest.raises(ValueError, match="dt must have x's shape"):
        selective_scan(x, dt[:, :3], A, B, C, D)
    with pytest.raises(ValueError, match=r"A .* must be \[D=48, N\]"):
        selective_scan(x, dt, A[:7], B, C, D)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(x, dt, A, B, C, D, initial_state=jnp.zeros((2, 48, 4)))
    with pytest.raises(ValueError, match="floating point"):
        selective_scan(x.astype(jnp.int32), dt, A, B, C, D)
    with pytest.raises(ValueError, match="unknown impl"):
        selective_scan(x, dt, A, B, C, D, impl="cuda")
    with pytest.raises(ValueError, match="interpret=True"):
        selective_scan(x, dt, A, B, C, D, impl="pallas")
    xm, dtm, Am, Bm, Cm, Dm, _ = _inputs("multihead", 2, 5, 8, jnp.float32, heads=4, groups=3)
    with pytest.raises(ValueError, match="multiple of the B/C groups"):
        selective_scan(xm, dtm, Am, Bm, Cm, Dm)
    with pytest.raises(ValueError, match="one scalar per head"):
        selective_scan(xm, dtm, Am[:2], Bm, Cm, Dm)


def test_canonical_layouts_agree():
    """The multi-head layout with H = G = 1 and P = D is Mamba-1 with per-channel Δ all equal."""
    x, dt, A, B, C, D, h0 = _inputs("mamba1", 2, 7, 8, jnp.float32, seed=5)
    dt1 = jnp.broadcast_to(dt[..., :1], dt.shape)
    a1 = jnp.broadcast_to(A[:1, :1], A.shape)
    want = reference.selective_scan(x, dt1, a1, B, C, jnp.full_like(D, D[0]))
    got = reference.selective_scan(x[:, :, None], dt[:, :, :1], A[:1, 0], B[:, :, None], C[:, :, None], D[:1])
    np.testing.assert_allclose(got[:, :, 0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blocks", [GpuBlocks(), GpuBlocks(segments=1, prefetch=False), GpuBlocks(tile=True),
                                    GpuBlocks(block_p=16, chunk=8, segments=1, parallel=True),
                                    GpuBlocks(block_p=16, chunk=16, segments=4, parallel=True),
                                    GpuBlocks(block_p=32, chunk=16, num_warps=4, segments=4, parallel=True,
                                              split_n=True, unroll=2, prefetch=True)],
                         ids=["default-segmented", "one-pass", "tile", "parallel", "parallel-segments4",
                              "parallel-split-segments4"])
def test_gpu_forward_lowers_to_triton(blocks):
    """The Triton lowering runs on CPU (cross-platform export), so ops the GPU backend lacks fail here,
    not on the device: the forward at Mamba-130m's mixer shape (8 segments by default: two kernels)."""
    from kernels.ssm_scan import gpu

    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    fwd = functools.partial(gpu.scan_canonical, blocks=blocks)  # canonical layout: one head of 1536 channels
    exp = jax.export.export(jax.jit(fwd), platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((2, 4096, 1, 1536), f32), S((2, 4096, 1, 1536), f32), S((1, 1536, 16), f32), S((2, 4096, 1, 16), f32),
        S((2, 4096, 1, 16), f32), S((1, 1536), f32), S((2, 1, 1536, 16), f32))
    assert exp.mlir_module().count("xla.gpu.triton") == (1 if blocks.segments == 1 else 2)


def test_gpu_training_forward_and_backward_lower_to_triton():
    """The chunk-parallel forward that stores states for the backward (take_last of a 3-D carry) and the
    backward lower to Triton on CPU too."""
    from kernels.ssm_scan import gpu

    S = jax.ShapeDtypeStruct
    f32 = jnp.float32

    def loss(*a):
        return jnp.sum(gpu.scan_canonical(*a, blocks=gpu.PARALLEL_BLOCKS)[0])

    exp = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        S((1, 256, 1, 64), f32), S((1, 256, 1, 64), f32), S((1, 64, 16), f32), S((1, 256, 1, 16), f32),
        S((1, 256, 1, 16), f32), S((1, 64), f32), S((1, 1, 64, 16), f32))
    assert exp.mlir_module().count("xla.gpu.triton") == 2


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_take_last(axis):
    """linrec.take_last: the last entry along an axis, eagerly, under jit and inside a Pallas kernel
    (interpret mode); its Triton rule is exercised by the lowering tests above."""
    from jax.experimental import pallas as pl

    from kernels.ssm_scan.linrec import take_last

    x = jax.random.normal(jax.random.key(0), (4, 8, 16), jnp.float32)
    want = np.take(np.asarray(x), -1, axis=axis)
    np.testing.assert_array_equal(take_last(x, axis), want)
    np.testing.assert_array_equal(jax.jit(lambda v: take_last(v, axis))(x), want)

    def kernel(x_ref, o_ref):
        o_ref[...] = take_last(x_ref[...], axis)

    got = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(want.shape, x.dtype), interpret=True)(x)
    np.testing.assert_array_equal(got, want)


def test_bench_config_names():
    """`kernels.ssm_scan.bench --configs` names: block_p x chunk, flags, segments, warps; bad ones stop argparse."""
    from kernels.ssm_scan.bench import parse_config

    b = parse_config("32x8ptw4", 16)
    assert (b.block_p, b.chunk, b.prefetch, b.tile, b.segments, b.num_warps) == (32, 8, True, True, 1, 4)
    b = parse_config("16x8cw8", 16)
    assert (b.block_p, b.chunk, b.parallel, b.tile, b.segments, b.num_warps) == (16, 8, True, False, 1, 8)
    b = parse_config("16x16ck8j32s4", 16)
    assert (b.block_p, b.chunk, b.parallel, b.bwd_chunk, b.bwd_block_p, b.segments) == (16, 16, True, 8, 32, 4)
    assert b.carry_in and not parse_config("16x16cok8w2", 16).carry_in
    assert parse_config("16x16cok8w2", 16).num_warps == 2
    b = parse_config("64x16bs8", 16)
    assert (b.block_p, b.chunk, b.batch_stores, b.segments, b.num_warps, b.max_state_regs) == (64, 16, True, 8, 0, 256)
    with pytest.raises(ValueError, match="bwd_chunk"):
        parse_config("16x8k4", 16).resolve(64, 16)  # a shorter backward chunk needs the parallel forward
    with pytest.raises(ValueError, match="bwd_chunk"):
        parse_config("16x8ck3", 16).resolve(64, 16)
    b = parse_config("32x16pcnk8j32u2w4", 16)
    assert (b.block_p, b.chunk, b.prefetch, b.parallel, b.split_n, b.unroll, b.num_warps) == (32, 16, True, True, True,
                                                                                             2, 4)
    r = b.resolve(64, 16)
    assert r.split_n and r.split_shape(16) == (4, 4, 4, 8)  # N_r, P_w, N_l, P_l
    r = b.resolve(64, 2)  # N = 2 cannot fill the 4 lanes P_l = 8 leaves: [T, N, P] tiles, one chunk per iteration
    assert (r.split_n, r.unroll) == (False, 1)
    with pytest.raises(ValueError, match="split_n carries the state in"):
        parse_config("16x16conw2", 16).resolve(64, 16)
    with pytest.raises(ValueError, match="split_n applies to the chunk-parallel"):
        parse_config("16x16nw2", 16).resolve(64, 16)
    for bad in ("16x16cu2w2", "16x16cnu3w2"):  # unroll 2 needs split tiles; 1 or 2 only
        with pytest.raises(ValueError, match="GpuBlocks.unroll"):
            parse_config(bad, 16).resolve(64, 16)
    for bad in ("32x8w3", "32x", "x8", "32x8q"):
        with pytest.raises(SystemExit, match="bad --configs entry"):
            parse_config(bad, 16)


def test_gpu_default_blocks():
    """Without blocks the GPU scan runs the chunk-parallel forward (with its own backward blocks) where it was
    measured faster, N a power of 2 up to 16; other state sizes keep the sequential default. Values and
    gradients of both against the reference, L not a multiple of either chunk."""
    from kernels.ssm_scan import gpu

    assert gpu.default_blocks(16) is gpu.PARALLEL_BLOCKS and gpu.default_blocks(8) is gpu.PARALLEL_BLOCKS
    assert gpu.default_blocks(64) == GpuBlocks() and gpu.default_blocks(12) == GpuBlocks()
    b = gpu.PARALLEL_BLOCKS.resolve(1536, 16)
    assert (b.chunk, b.ck_every, b.backward_blocks().block_p, b.backward_blocks().chunk) == (16, 8, 32, 8)
    # below: D 48 (two 32-channel programs), L 37 = 3 chunks of 16, so two per iteration and one after the loop
    assert b.split_n and b.unroll == 2 and not b.backward_blocks().split_n
    check("pallas_gpu", "mamba1", 37, 16, jnp.float32)


def test_sass_tool_extracts_the_triton_ir():
    """kernels.ssm_scan.sass (the CPU-side SASS inspection of docs/DEVELOPING.md): the default forward's IR,
    without locations, holds the chunk scan and the take_last reduction; the loop counter finds the innermost
    backward branch of a cuobjdump listing."""
    from kernels.ssm_scan import gpu
    from kernels.ssm_scan.sass import loop_counts, triton_modules

    mods = triton_modules(gpu.PARALLEL_BLOCKS, batch=1, length=256, dim=64)
    assert list(mods) == ["ssm_scan_fwd"]
    ir = mods["ssm_scan_fwd"]
    assert '"tt.scan"' in ir and '"tt.reduce"' in ir and "#loc" not in ir and "[unknown]" not in ir
    # one exp2 per (step, state, channel), as one tile op per chunk of the loop body (16 chunks: no remainder)
    assert ir.count("__nv_exp2f") == gpu.PARALLEL_BLOCKS.unroll
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R3 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   FFMA R4, R2, R5, R6 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    c = loop_counts(listing)
    assert (c["loop_instructions"], c["barriers"], c["mufu"]) == (4, 1, 1)
