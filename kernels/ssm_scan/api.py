"""`selective_scan(...)`: one entry point, the implementation chosen per backend.

impl:
- "auto": the Pallas kernel of the backend (GPU: Triton, TPU: Mosaic), else "xla".
- "pallas": the Pallas kernel of the backend; with `interpret=True` the GPU kernel runs on CPU.
- "pallas_gpu" / "pallas_tpu": that kernel (interpret mode on a CPU).
- "xla": lax.scan over chunks with an associative_scan inside (rematerialized in the backward).
- "associative": one associative_scan over the whole sequence (memory O(Bt·L·D·N)).
- "reference": the sequential lax.scan of reference.py.
- "ssd": the chunked matmul (state space dual) form of ssd.py; multi-head layout only (scalar
  decay per head). Mostly matmuls, so the fastest XLA path for training that layout.
"""
from __future__ import annotations

import jax

from kernels.ssm_scan import gpu, reference, ssd, tpu

IMPLS = ("auto", "pallas", "pallas_gpu", "pallas_tpu", "xla", "associative", "reference", "ssd")


def _resolve(impl: str, interpret: bool) -> str:
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: unknown impl {impl!r}; choose one of {IMPLS}")
    backend = jax.default_backend()
    if impl == "auto":
        return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")
    if impl == "pallas":
        if backend in ("gpu", "tpu"):
            return f"pallas_{backend}"
        if interpret:
            return "pallas_gpu"
        raise ValueError(f"selective_scan: no Pallas kernel runs natively on {backend!r}; "
                         "pass interpret=True (tests) or impl='xla'")
    if impl in ("pallas_gpu", "pallas_tpu") and not interpret and backend != impl.split("_")[1]:
        raise ValueError(f"selective_scan: impl={impl!r} needs a {impl.split('_')[1].upper()} "
                         f"(default backend is {backend!r}); pass interpret=True to emulate it")
    return impl


def selective_scan(x, dt, A, B, C, D=None, *, initial_state=None, return_final_state: bool = False,
                   impl: str = "auto", blocks=None, interpret: bool = False, chunk: int = 128):
    """The selective scan of Mamba in either layout (see reference.py for shapes).

    Returns y (x's shape and dtype), or (y, final state fp32) with return_final_state.
    blocks: `gpu.GpuBlocks` / `tpu.TpuBlocks` for the Pallas kernels; chunk: the "xla" chunk
    (for "ssd", min(chunk, 64): its [chunk, chunk] decay matrices grow quadratically).
    """
    impl = _resolve(impl, interpret)
    c = reference.canonicalize(x, dt, A, B, C, D, initial_state)
    if impl == "ssd":
        if not c.multihead:
            raise ValueError("selective_scan: impl='ssd' needs the multi-head layout (x [Bt, L, H, P], one decay "
                             "per head); the Mamba-1 layout has a decay per channel and state")
        y, h = ssd.ssd_scan(x, dt, A, B, C, D, initial_state, chunk=min(chunk, 64))
        return (y, h) if return_final_state else y
    args = (c.x, c.dt, c.A, c.B, c.C, c.D, c.h0)
    if impl == "pallas_gpu":
        y, h = gpu.scan_canonical(*args, blocks=blocks, interpret=interpret)
    elif impl == "pallas_tpu":
        if interpret is True:
            from jax.experimental.pallas import tpu as pltpu

            interpret = pltpu.InterpretParams()
        y, h = tpu.scan_canonical(*args, blocks=blocks or tpu.TpuBlocks(), interpret=interpret)
    elif impl == "xla":
        y, h = reference.scan_chunked(*args, chunk=chunk)
    elif impl == "associative":
        y, h = reference.scan_associative(*args)
    else:
        y, h = reference.scan_canonical(*args)
    y, h = reference.restore(c, y, h)
    return (y, h) if return_final_state else y
