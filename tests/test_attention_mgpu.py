"""The Mosaic GPU (Hopper) attention kernels on CPU, in Pallas' GPU interpret mode.

The interpreter runs each warpgroup as a thread and simulates SMEM, TMA copies and barriers (a barrier
phase skipped or awaited twice raises); with `detect_races` it also flags unsynchronised SMEM/GMEM
accesses between warpgroups. mgpu_common swaps wgmma, layout casts and the TMA reduce-add for plain jnp
there, so these tests check the kernels' pipelines, index ranges, masking and arithmetic, and
tests/test_attention_gpu.py checks the same cases compiled on a Hopper GPU. The pairwise cover of the
Mosaic GPU factors is marked slow (interpreting is slow); the default run takes three cases that
together cover both backward head dims, GQA 1/4/8, causal and full, window, softcap and both dtypes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_cases as cases
from kernels.attention import common, gpu_mosaic, gpu_mosaic_bwd, gpu_triton, mgpu_common, reference

pytestmark = pytest.mark.skipif(mgpu_common.interpret_params() is None,
                                reason="this JAX has no Pallas Mosaic GPU interpret mode")

MGPU = functools.partial(gpu_mosaic.flash_attention, interpret=True)

# One case through the custom VJP end to end (head dim 128: dQ split over both warpgroups, softcap);
# the race test below covers head dim 64, GQA, window, fp16 and several tiles.
DEFAULT = dict(head_dim=128, group=1, causal=True, window=None, segments=False, softcap=20.0, layout="default",
               dtype="bfloat16")


def test_mosaic_gpu_interpret():
    cases.check(MGPU, DEFAULT)


@pytest.mark.slow
@pytest.mark.parametrize("case", cases.MGPU_PAIRWISE, ids=cases.case_id)
def test_mosaic_gpu_interpret_pairwise(case):
    cases.check(MGPU, case)


def _races_found() -> bool:
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    return bool(gpu_callbacks.get_races().races_found)


# 74-97 s each on the 2-core CI machine (2026-12-05): slow set (test_mosaic_gpu_interpret keeps a value check of
# these kernels in the default run)
@pytest.mark.slow
@pytest.mark.parametrize("causal,window,group,dtype", [(True, 40, 2, jnp.bfloat16), (False, None, 1, jnp.float16)])
def test_kernels_have_no_races_and_match_reference(monkeypatch, causal, window, group, dtype):
    """Forward and backward separately (the race record is per kernel), several tiles and pipeline wraps."""
    monkeypatch.setitem(mgpu_common.INTERPRET_OPTIONS, "detect_races", True)
    b, t, hkv, d = 1, 300, 1, 64
    hq = hkv * group
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
    k, v = (jax.random.normal(kk, (b, t, hkv, d), jnp.float32).astype(dtype) for kk in ks[1:3])
    do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(ks[4], (b, hq, t), jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    kw = dict(q_positions=None, kv_lengths=None, causal=causal, window=window, softcap=None)
    (o, lse), vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, return_lse=True, **kw), f32(q), f32(k),
                            f32(v))
    want = vjp((f32(do), dlse))
    tp = 384  # a multiple of every block
    pad = lambda x, axis=1: common.pad_axis(x, axis, tp)  # noqa: E731
    rel = lambda a, w: float(np.linalg.norm(f32(a) - w) / np.linalg.norm(w))  # noqa: E731

    st = gpu_mosaic._Static(causal=causal, window=window, softcap=None, scale=d**-0.5, tk=t,
                            blocks=gpu_mosaic.BlockSizes.for_head_dim(d), interpret=True)
    out, lse2 = jax.block_until_ready(gpu_mosaic._forward(pad(q), pad(k), pad(v), st))
    assert not _races_found(), "forward: unsynchronised accesses"
    tol_f, tol_b = cases.TOL[jnp.dtype(dtype).name]
    assert rel(out[:, :t], o) < tol_f
    assert rel(lse2[:, :, :t] * common.LN2, lse) < tol_f

    grads = jax.block_until_ready(gpu_mosaic_bwd.backward(
        pad(q), pad(k), pad(v), pad(o.astype(dtype)), pad(lse / common.LN2, 2), pad(do), pad(dlse, 2),
        causal=causal, window=window, softcap=None, scale=d**-0.5, tk=t, blocks=gpu_mosaic_bwd.BackwardBlocks(),
        interpret=True))
    assert not _races_found(), "backward: unsynchronised accesses"
    for name, g, w in zip("qkv", grads, want):
        assert rel(g[:, :t], w) < tol_b, f"d{name}"


def test_q_ranges_classify_every_block():
    """Needed / mask-free query blocks for a key block, against the brute-force mask."""
    bk, bq, nq, t = 64, 64, 6, 330
    for causal, window in [(True, None), (False, 50), (True, 100), (False, None), (True, 1)]:
        for k0 in range(0, 384, 64):
            lo, flo, fhi, hi = map(int, gpu_mosaic_bwd.q_ranges(jnp.int32(k0), bk, bq, nq, tk=t, causal=causal,
                                                                window=window))
            assert lo <= flo <= fhi <= hi
            for qb in range(nq):
                r = np.arange(qb * bq, qb * bq + bq)[:, None]
                c = np.arange(k0, k0 + bk)[None, :]
                ok = c < t
                if causal:
                    ok = ok & (c <= r)
                if window is not None:
                    ok = ok & (r - c < window)
                assert ok.any() <= (lo <= qb < hi), (causal, window, k0, qb)  # every needed block is visited
                assert (flo <= qb < fhi) <= ok.all(), (causal, window, k0, qb)  # mask-free only if all visible


def test_backward_blocks_and_head_dims_are_checked():
    with pytest.raises(ValueError, match="block_k"):
        gpu_mosaic_bwd.BackwardBlocks(block_k=128)
    with pytest.raises(ValueError, match="block_q"):
        gpu_mosaic_bwd.BackwardBlocks(block_q=96)
    q = jnp.zeros((1, 64, 2, 256), jnp.bfloat16)
    k = jnp.zeros((1, 64, 2, 256), jnp.bfloat16)
    blocks = gpu_mosaic.BlockSizes(backward=gpu_mosaic_bwd.BackwardBlocks())
    with pytest.raises(common.Unsupported, match="head_dim 256"):
        gpu_mosaic.flash_attention(q, k, k, block_sizes=blocks, interpret=True)
    # By default head_dim 256 keeps the Triton backward, whose blocks set the padding.
    assert isinstance(gpu_mosaic._backward_blocks(gpu_mosaic.BlockSizes.for_head_dim(256), 256),
                      gpu_triton.BlockSizes)


@pytest.mark.parametrize("d,causal", [(64, True), (128, False)])
def test_backward_lowers_for_cuda(d, causal):
    """The Mosaic GPU lowering (layouts, transposed wgmma operands, TMA reduce-add) runs without a GPU."""
    b, t, hkv, g = 1, 256, 2, 4
    shape = jax.ShapeDtypeStruct
    q, kv = shape((b, t, hkv * g, d), jnp.bfloat16), shape((b, t, hkv, d), jnp.bfloat16)
    row = shape((b, hkv * g, t), jnp.float32)
    f = jax.jit(functools.partial(gpu_mosaic_bwd.backward, causal=causal, window=None, softcap=30.0, scale=d**-0.5,
                                  tk=t - 5, blocks=gpu_mosaic_bwd.BackwardBlocks()))
    text = f.trace(q, kv, kv, q, row, q, row).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
