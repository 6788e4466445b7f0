"""What the Mosaic GPU attention kernels (forward in gpu_mosaic.py, backward in gpu_mosaic_bwd.py) share.

The GPU interpret mode of jax 0.10 (`jax._src.pallas.mosaic_gpu.interpret`, private) runs a Mosaic GPU
kernel on the CPU: every warpgroup is a thread, barriers and TMA copies are simulated (a barrier phase
awaited twice or skipped raises). It runs wgmma only on untransposed SMEM operands and has no rule for
layout_cast, layouted iota, layouted loads, run_state or TMA reductions. The helpers below keep the
kernels' synchronisation, indexing and masking identical in both modes and swap only those operations,
so the CPU tests check everything but the wgmma operand encoding and register layouts (which the GPU
tests check).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


# Extra InterpretGPUParams fields for every interpreted kernel (tests turn on detect_races here).
INTERPRET_OPTIONS: dict = {}


def interpret_params(**kw):
    """The GPU interpret mode's parameters, or None where this JAX lacks the (private) interpreter."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams(**{**INTERPRET_OPTIONS, **kw})


def mma(interp: bool, shape, a, b, *, acc=None, a_ref=True, a_t=False, b_t=False, between=None):
    """acc + a(.T) @ b(.T) in fp32 by wgmma: a an SMEM ref (a_ref) or registers, b an SMEM ref.

    `between` runs after issuing the wgmma and before waiting on it (a schedule barrier)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    if interp:
        av = a[...] if a_ref else a
        av = av.T if a_t else av
        bv = b[...].T if b_t else b[...]
        out = jnp.dot(av, bv, preferred_element_type=jnp.float32)
        if between is not None:
            between()
        return out if acc is None else acc + out
    at = a.transpose((1, 0)) if a_t else a
    bt = b.transpose((1, 0)) if b_t else b

    def fn(acc_ref):
        plgpu.wgmma(acc_ref, at, bt)
        if between is not None:
            between()
        if acc is None:
            return acc_ref[...]

    if acc is None:
        return pl.run_scoped(fn, plgpu.ACC(shape, jnp.float32))
    return pl.run_state(fn)(plgpu.ACC.init(acc))


def _wgmma_layout(kind: str):
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return {"WGMMA": plgpu.Layout.WGMMA, "ROW": plgpu.Layout.WGMMA.reduce(1),
            "COL": plgpu.Layout.WGMMA.reduce(0)}[kind]


def layout(interp: bool, x, kind: str = "WGMMA"):
    """x in the wgmma accumulator layout ("WGMMA"), or as one value per row ("ROW") / column ("COL")."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return x if interp else plgpu.layout_cast(x, _wgmma_layout(kind))


def iota(interp: bool, shape, dim: int):
    import jax.experimental.pallas.mosaic_gpu as plgpu
    if interp:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def load_vec(interp: bool, ref, kind: str):
    """A [n] SMEM vector as one value per row ("ROW") or per column ("COL") of a wgmma tile."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return ref[...] if interp else plgpu.load(ref, (), layout=_wgmma_layout(kind))
