"""The attention kernels compiled for a real GPU (skipped elsewhere): the same checks as the CPU tests.

    python -m pytest tests/test_attention_gpu.py -q            # pairwise covers (Triton, Mosaic GPU, decode)
    python -m pytest tests/test_attention_gpu.py -q -m slow    # the full product of the sweep
"""
import functools

import jax
import jax.numpy as jnp
import pytest

import attention_cases as cases
from kernels.attention import decode, gpu_mosaic, gpu_triton, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]

# On the GPU the sequences are long enough for several blocks, partial tiles and block skipping.
SIZES = {"default": dict(tq=300), "ragged": dict(tq=200), "cache": dict(tq=9, tk=500)}


def _hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


@pytest.mark.parametrize("case", cases.PAIRWISE, ids=cases.case_id)
def test_triton_gpu(case):
    cases.check(gpu_triton.flash_attention, case, **SIZES[case["layout"]])


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", cases.MGPU_PAIRWISE, ids=cases.case_id)
def test_mosaic_gpu(case):
    cases.check(gpu_mosaic.flash_attention, case, **SIZES["default"])


@pytest.mark.parametrize("tq,tk,group,dtype", [(1, 4096, 4, "bfloat16"), (4, 1000, 8, "float16"),
                                               (2, 777, 1, "float32")])
def test_decode_gpu(tq, tk, group, dtype):
    b, hkv, d = 4, 2, 128
    ks = jax.random.split(jax.random.key(tk), 3)
    q = jax.random.normal(ks[0], (b, tq, hkv * group, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, hkv, d), jnp.float32).astype(dtype)
    lens = jnp.asarray([tk, tk // 2, tq, 300], jnp.int32)
    pos = (lens[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None]).astype(jnp.int32)
    kw = dict(q_positions=pos, kv_lengths=lens, window=None if tq == 1 else 256, softcap=None)
    out, lse = jax.jit(functools.partial(decode.decode_attention, backend="triton", return_lse=True, **kw))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_lse = reference.attention(f32(q), f32(k), f32(v), return_lse=True, **kw)
    tol = cases.TOL[dtype][0]
    assert cases._rel(f32(out), ref) < tol
    assert cases._rel(lse, ref_lse) < tol


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("case", cases.FULL, ids=cases.case_id)
def test_triton_gpu_full(case):
    cases.check(gpu_triton.flash_attention, case, **SIZES[case["layout"]])


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.skipif(jax.default_backend() != "gpu" or not _hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", cases.MGPU_FULL, ids=cases.case_id)
def test_mosaic_gpu_full(case):
    cases.check(gpu_mosaic.flash_attention, case, **SIZES["default"])
