"""Chooses an attention implementation.

Implementations (all take `reference.attention`'s signature):
  xla            the pure-jnp reference (any backend, every feature)
  cudnn          jax.nn.dot_product_attention(implementation="cudnn"): default layout only
  pallas_mgpu    Mosaic GPU flash forward (Hopper), Triton backward
  pallas_triton  Triton-lowered flash forward/backward, or flash-decoding for few queries
  pallas_tpu     Mosaic TPU flash forward/backward, or flash-decoding for few queries
  pallas         the current backend's Pallas kernels (GPU: Triton; TPU: Mosaic TPU; CPU: Triton, interpreted)
  auto           the fastest implementation that supports the call on the current backend

"Default layout" means `q_positions=None` (query i at slot i) and `kv_lengths=None` (all keys
valid): what a model passes when it attends without a cache. Kernels that only know that
layout (cuDNN's, the Mosaic GPU one) can then serve the call; slot-addressed calls (decode,
prefill into a cache) go to the kernels that read the slots.
"""
from __future__ import annotations

from typing import Callable

import jax

from kernels import under_split_mesh
from kernels.attention import common, decode, gpu_mosaic, gpu_triton, reference, tpu

_IMPLS: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
    _IMPLS[name] = fn


def available() -> list[str]:
    return ["auto", *sorted(_IMPLS)]


def _backend() -> str:
    return jax.default_backend()


def _is_decode(q, k, kw) -> bool:
    """Few query rows per KV head against a longer KV: flash-decoding beats a query-tiled kernel."""
    tq, hq, tk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    return (hq // hkv) * tq <= decode.MAX_DECODE_ROWS and tq <= 16 and tk > tq


# ----------------------------------------------------------------------------- implementations
def _xla(q, k, v, **kw):
    return reference.attention(q, k, v, **kw)


def _cudnn_supports(q, k, v, *, q_positions, kv_lengths, segment_ids=None, softcap=None, mask=None,
                    return_lse=False, window=None, **_) -> str | None:
    if q_positions is not None:
        return "q_positions: cudnn serves the default layout (q_positions=None) only"
    if segment_ids is not None or softcap is not None or mask is not None or return_lse:
        return "cudnn serves plain causal / sliding-window attention (no segment_ids, softcap, mask, lse)"
    if q.shape[1] != k.shape[1]:
        return "cudnn path needs Tq == Tk"
    if q.dtype != k.dtype or q.dtype != v.dtype or str(q.dtype) not in ("bfloat16", "float16"):
        return f"cudnn takes bfloat16/float16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[3] % 8 or q.shape[3] > 256:
        return f"head_dim {q.shape[3]} is not supported by cudnn"
    if _backend() != "gpu":
        return "cudnn needs a CUDA GPU"
    return None


def _cudnn_placement(q, k, v):
    """Under a split mesh, one sharding for q, k and v: batch over the batch axes, heads over the
    heads axes (when they divide both Hq and Hkv), sequence and head_dim whole.

    cuDNN's custom_partitioning rule (jax/_src/cudnn/fused_attention_stablehlo.py,
    _check_qkv_bias_mask_spec) raises unless q, k, v share one spec with T and D unsplit. On an
    fsdp mesh XLA's propagation can otherwise hand them specs derived from the fsdp-sharded
    projection weights (q and k/v differ under GQA), and compilation fails with
    `INTERNAL: custom_partitioner` (2x H200 run of eval.bench_scaleout, 2026-11-23)."""
    import math

    from flashit_jax import sharding as shd
    from kernels import under_split_mesh

    if not under_split_mesh():
        return q, k, v
    mesh = jax.sharding.get_abstract_mesh()
    spec = shd.logical_to_spec(("batch", "length", "heads", None), mesh, shd.DEFAULT_RULES, q.shape)
    spec = tuple(spec) + (None,) * (4 - len(spec))
    heads = spec[2]
    if heads is not None:
        n = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads))
        if k.shape[2] % n:
            spec = spec[:2] + (None, None)
    spec = jax.sharding.PartitionSpec(*spec)
    return tuple(jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v))


def _cudnn(q, k, v, *, q_positions=None, kv_lengths=None, causal=True, window=None, segment_ids=None,
           softcap=None, scale=None, mask=None, return_lse=False):
    why = _cudnn_supports(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths, segment_ids=segment_ids,
                          softcap=softcap, mask=mask, return_lse=return_lse)
    if why:
        raise common.Unsupported(why)
    q, k, v = _cudnn_placement(q, k, v)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=kv_lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn",
    )


def _triton(q, k, v, *, interpret=None, **kw):
    interpret = _backend() == "cpu" if interpret is None else interpret
    if _is_decode(q, k, kw) and kw.get("mask") is None:
        return decode.decode_attention(q, k, v, backend="triton", interpret=interpret, **kw)
    return gpu_triton.flash_attention(q, k, v, interpret=interpret, **kw)


def _tpu(q, k, v, *, interpret=None, **kw):
    interpret = _backend() == "cpu" if interpret is None else interpret
    if _is_decode(q, k, kw) and kw.get("mask") is None:
        return decode.decode_attention(q, k, v, backend="tpu", interpret=interpret, **kw)
    return tpu.flash_attention(q, k, v, interpret=interpret, **kw)


def _mgpu(q, k, v, **kw):
    return gpu_mosaic.flash_attention(q, k, v, **kw)


def _pallas(q, k, v, **kw):
    """The current backend's Pallas kernels. An explicit `mask` (tree attention) is served by XLA.

    On GPUs this is the Triton path: the Mosaic GPU forward (opt-in as "pallas_mgpu") runs at 0.89-1.02x
    the better of cuDNN and tokamax forward on an H200, but its backward is the Triton one (0.39-0.43x
    forward+backward), docs/attention.md.
    """
    if kw.get("mask") is not None:
        return reference.attention(q, k, v, **kw)
    if _backend() == "tpu":
        return _tpu(q, k, v, **kw)
    return _triton(q, k, v, **kw)


register("xla", _xla)
register("cudnn", _cudnn)
register("pallas", _pallas)
register("pallas_triton", _triton)
register("pallas_tpu", _tpu)
register("pallas_mgpu", _mgpu)


# ----------------------------------------------------------------------------- choosing
def supports(impl: str, q, k, v, **kw) -> str | None:
    """None if `impl` can serve the call here, else why not (a message naming the argument)."""
    if impl == "xla":
        return None
    if impl == "cudnn":
        return _cudnn_supports(q, k, v, **kw)
    if impl == "pallas_mgpu":
        return gpu_mosaic.supports(q, k, v, **kw)
    if impl in ("pallas", "pallas_triton", "pallas_tpu"):
        try:
            common.check(q, k, v, window=kw.get("window"), softcap=kw.get("softcap"), mask=None)
        except common.Unsupported as e:
            return str(e)
        if kw.get("mask") is not None and impl != "pallas":
            return "mask (an explicit [B, 1|Hq, Tq, Tk] mask) is served by the xla path only"
        return None
    return f"unknown attention impl {impl!r}; known: {available()}"


def choose(q, k, v, **kw) -> str:
    """What `impl="auto"` runs: fastest first, by `python -m kernels.attention.bench` (docs/attention.md).

    H100, 2026-11-23: decode, Triton flash-decoding 2.2-2.6x XLA; prefill, cuDNN 518 / Triton 256 /
    XLA 110 TFLOP/s forward (L4096). H200, 2026-12-04: our Mosaic GPU forward 0.89-0.98x cuDNN's speed at
    head_dim 128 and its forward+backward (Triton backward) 0.4x, so cuDNN stays first.
    """
    backend = _backend()
    if under_split_mesh():  # Pallas kernels have no SPMD partitioning rule; cuDNN's attention has one
        order = ["xla"] if backend != "gpu" or _is_decode(q, k, kw) else ["cudnn", "xla"]
    elif backend == "gpu":
        if _is_decode(q, k, kw):
            order = ["pallas_triton", "xla"]
        else:
            order = ["cudnn", "pallas_triton", "xla"]
    elif backend == "tpu":
        order = ["pallas_tpu", "xla"]
    else:  # CPU: interpreted kernels are for tests, XLA is the fast path
        order = ["xla"]
    for impl in order:
        if supports(impl, q, k, v, **kw) is None:
            return impl
    return "xla"


def attention(q, k, v, *, impl: str = "auto", **kw):
    if impl == "auto":
        impl = choose(q, k, v, **kw)
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown attention impl {impl!r}; known: {available()}") from None
    return fn(q, k, v, **kw)
