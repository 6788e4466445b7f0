"""Pallas attention kernels against the reference, in interpret mode on CPU.

Triton-lowered GPU kernels run with `interpret=True`, Mosaic TPU kernels with
`pltpu.InterpretParams()`; the Mosaic GPU kernels run in Pallas' GPU interpret mode in
tests/test_attention_mgpu.py and compiled in tests/test_attention_gpu.py on a Hopper GPU. The default
run covers every pair of factor levels (tests/attention_cases.py); the full product is marked slow.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_cases as cases
from kernels.attention import common, decode, gpu_triton, reference, tpu

TRITON = functools.partial(gpu_triton.flash_attention, interpret=True)
TPU = functools.partial(tpu.flash_attention, interpret=True)


@pytest.mark.parametrize("case", cases.half_slow(cases.PAIRWISE, 0))
def test_triton_flash_pairwise(case):
    cases.check(TRITON, case)


@pytest.mark.parametrize("case", cases.half_slow(cases.PAIRWISE, 1))
def test_tpu_flash_pairwise(case):
    cases.check(TPU, case)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("case", cases.FULL, ids=cases.case_id)
def test_triton_flash_full(case):
    cases.check(TRITON, case)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("case", cases.FULL, ids=cases.case_id)
def test_tpu_flash_full(case):
    cases.check(TPU, case)


def test_triton_multiple_blocks_and_small_blocks():
    """Several q/k blocks per program, separate dq and dk/dv block sizes, block skipping on both sides."""
    blocks = gpu_triton.BlockSizes(block_q=16, block_k=32, block_q_dq=32, block_k_dq=16, block_q_dkv=16,
                                   block_k_dkv=32)
    case = dict(head_dim=64, group=4, causal=True, window=24, segments=False, softcap=None, layout="ragged",
                dtype="float32")
    cases.check(functools.partial(TRITON, block_sizes=blocks), case, tq=100)


def test_tpu_multiple_blocks():
    blocks = tpu.BlockSizes(block_q=64, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=32, block_k_dkv=128)
    case = dict(head_dim=128, group=2, causal=True, window=None, segments=True, softcap=None, layout="default",
                dtype="float32")
    cases.check(functools.partial(TPU, block_sizes=blocks), case, tq=260)


# ----------------------------------------------------------------------------- decode
DECODE_CASES = [
    dict(tq=1, tk=256, group=4, window=None, softcap=None, dtype="float32", lens=(1, 100, 256)),
    dict(tq=3, tk=384, group=8, window=40, softcap=30.0, dtype="bfloat16", lens=(3, 300, 17)),
    dict(tq=2, tk=200, group=1, window=None, softcap=None, dtype="float16", lens=(200, 2, 150)),
]


@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("dc", DECODE_CASES, ids=lambda c: f"tq{c['tq']}-tk{c['tk']}-g{c['group']}-{c['dtype']}")
def test_decode(backend, dc):
    """Few queries at the last slots of a cache with per-sequence lengths; splits merged by lse."""
    b, hkv, d = 3, 2, 128
    dtype = jnp.dtype(dc["dtype"])
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (b, dc["tq"], hkv * dc["group"], d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, dc["tk"], hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, dc["tk"], hkv, d), jnp.float32).astype(dtype)
    lens = jnp.asarray(dc["lens"], jnp.int32)
    qpos = (lens[:, None] - dc["tq"] + jnp.arange(dc["tq"], dtype=jnp.int32)[None]).astype(jnp.int32)
    kw = dict(q_positions=qpos, kv_lengths=lens, window=dc["window"], softcap=dc["softcap"])
    # Small blocks and many splits so that several splits (some empty) are merged.
    blocks = (gpu_triton.DecodeBlockSizes(block_k=32, num_splits=4) if backend == "triton"
              else tpu.DecodeBlockSizes(block_k=128, num_splits=3))
    out, lse = decode.decode_attention(q, k, v, backend=backend, interpret=True, block_sizes=blocks,
                                       return_lse=True, **kw)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_lse = reference.attention(f32(q), f32(k), f32(v), return_lse=True, **kw)
    tol = cases.TOL[dc["dtype"]][0]
    assert cases._rel(f32(out), ref) < tol
    assert bool(jnp.all(jnp.isfinite(lse) == jnp.isfinite(ref_lse)))
    assert cases._rel(jnp.where(jnp.isfinite(ref_lse), lse, 0), jnp.where(jnp.isfinite(ref_lse), ref_lse, 0)) < tol


def test_decode_gradient_falls_back_to_reference():
    q = jax.random.normal(jax.random.key(0), (1, 1, 4, 64), jnp.float32)
    k = jax.random.normal(jax.random.key(1), (1, 64, 1, 64), jnp.float32)
    kw = dict(q_positions=jnp.asarray([[40]], jnp.int32), kv_lengths=jnp.asarray([41], jnp.int32))
    f = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, **kw) ** 2)  # noqa: E731
    got = jax.grad(f(functools.partial(decode.decode_attention, interpret=True)), argnums=(0, 1, 2))(q, k, k)
    want = jax.grad(f(reference.attention), argnums=(0, 1, 2))(q, k, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- block tables
def test_block_ranges_cover_every_allowed_pair():
    """The host-side tables may over-approximate (the mask is applied inside) but never skip a pair."""
    rng = np.random.default_rng(0)
    b, tq, tk, bq, bk = 3, 64, 96, 16, 32
    qpos = jnp.asarray(np.sort(rng.integers(0, tk, (b, tq)), axis=1), jnp.int32)
    kvlen = jnp.asarray([96, 50, 0], jnp.int32)
    for causal, window in [(True, None), (False, None), (True, 8), (False, 20)]:
        ok = reference.build_mask(qpos, kvlen, tk, causal=causal, window=window)[:, 0]  # [B, Tq, Tk]
        need = np.asarray(ok.reshape(b, tq // bq, bq, tk // bk, bk).any(axis=(2, 4)))  # [B, nq, nk]
        lo, hi = common.kv_block_range(qpos, kvlen, bq, bk, tk // bk, causal=causal, window=window)
        j = np.arange(tk // bk)
        visited = (j >= np.asarray(lo)[..., None]) & (j < np.asarray(hi)[..., None])
        assert not np.any(need & ~visited)
        qlo, qhi = common.q_block_range(qpos, kvlen, bq, bk, tk // bk, causal=causal, window=window)
        i = np.arange(tq // bq)
        visited_q = (i >= np.asarray(qlo)[..., None]) & (i < np.asarray(qhi)[..., None])  # [B, nk, nq]
        assert not np.any(need.transpose(0, 2, 1) & ~visited_q)
        if causal:  # and they do skip: causal tables visit fewer blocks than the full grid
            assert visited.sum() < visited.size


def test_combine_splits_equals_one_softmax():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((4, 8)) * 3  # 4 splits of 8 logits
    v = rng.standard_normal((4, 8, 5))
    lse = np.log(np.exp(s).sum(-1))
    o = np.einsum("sk,skd->sd", np.exp(s - lse[:, None]), v)
    lse[2] = -np.inf  # an empty split
    o[2] = 0.0
    got, got_lse = common.combine_splits(jnp.asarray(o, jnp.float32), jnp.asarray(lse, jnp.float32))
    keep = np.array([0, 1, 3])
    p = np.exp(s[keep].reshape(-1) - np.log(np.exp(s[keep]).sum()))
    np.testing.assert_allclose(np.asarray(got), p @ v[keep].reshape(-1, 5), rtol=1e-5)
    np.testing.assert_allclose(float(got_lse), np.log(np.exp(s[keep]).sum()), rtol=1e-6)


def test_decode_grid_is_one_wave_of_resident_ctas():
    # bk64 x D128 bf16 at 3 stages keeps 2 K/V tiles (64 KB) in shared memory: 3 CTAs per 228 KB SM
    b = gpu_triton.DecodeBlockSizes(block_k=64, num_stages=3)
    assert b.programs(128, 2) == 3 * gpu_triton._sm_count()
    # bk128 at 4 stages: 192 KB, one CTA per SM; an explicit target wins
    assert gpu_triton.DecodeBlockSizes(block_k=128, num_stages=4).programs(128, 2) == gpu_triton._sm_count()
    assert gpu_triton.DecodeBlockSizes(target_programs=528).programs(128, 2) == 528
