"""The decode GEMV of `gpu.py` on 4-bit weights: one or a few rows against `u4x2` codes.

`u4x2` stores two 4-bit codes per byte, column j in the low nibble and column j + N/2 in the high
one (kernels/qmatmul/reference.py), with a scale (and, asymmetric, a zero) per group of rows:
w = code * s + z, or (code - 8) * s. Each program owns `bn` byte columns, so both halves of the
output, and a K range; every [bk, bn] byte tile is unpacked and dequantized in registers
(a tile lies in one group: bk divides the group size) and accumulated elementwise in fp32, one
reduction at the end, partial sums over K splits added as in the bf16 kernel (by XLA, or in the
kernel: Blocks.fixup). The dequantized matrix never exists; HBM sees the codes, scales and zeros once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gemv.gpu import (GLUS, Blocks, _finish_splits, _plan, _pow2_at_most, _x_prologue, blocks_for,
                              int_to_f32, resolve_fixup)


def q4_supported(k: int, n: int, groups: int) -> str:
    """'' if matvec_q4 runs this weight, else why not."""
    if n % 2:
        return f"u4x2 needs an even column count, got N={n}"
    group = k // groups
    if groups > 1 and (group < 16 or group & (group - 1)):
        return f"group size {group} is not a power of two >= 16"
    return ""


def _q4_kernel(x_ref, q_ref, s_ref, z_ref, g_ref, *refs, m: int, k: int, half: int, ks: int, bk: int, bn: int,
               group: int, offset: int, has_zeros: bool, convert: str, fixup: bool, splits: int, interpret: bool,
               norm, glu, has_residual: bool):
    f32 = jnp.float32
    col = pl.program_id(0) * bn + jnp.arange(bn)  # byte columns: outputs col and col + half
    cmask = col < half
    k0 = pl.program_id(1) * ks
    x_rows = _x_prologue(x_ref, g_ref, m=m, k=k, norm=norm, glu=glu)  # g_ref: the norm's scale

    def body(i, accs):
        start = k0 + i * bk
        rows = start + jnp.arange(bk)
        rmask = rows < jnp.minimum(k, k0 + ks)
        b = plgpu.load(q_ref.at[rows[:, None], col[None, :]], mask=rmask[:, None] & cmask[None, :],
                       other=0).astype(jnp.int32)
        g = start // group
        ws = []
        for codes, c in (((b & 15), col), ((b >> 4) & 15, col + half)):
            s = plgpu.load(s_ref.at[g, c], mask=cmask, other=0).astype(f32)
            if has_zeros:
                z = plgpu.load(z_ref.at[g, c], mask=cmask, other=0).astype(f32)
                ws.append(int_to_f32(codes, convert=convert) * s[None, :] + z[None, :])  # (code * s) + z, GGUF's order
            else:
                ws.append(int_to_f32(codes, offset=offset, convert=convert) * s[None, :])
        out = []
        for r, xr in enumerate(x_rows(rows, rmask)):
            out.append(accs[2 * r] + xr[:, None] * ws[0])
            out.append(accs[2 * r + 1] + xr[:, None] * ws[1])
        return tuple(out)

    zero = jnp.zeros((bk, bn), f32)
    accs = jax.lax.fori_loop(0, pl.cdiv(ks, bk), body, tuple(zero for _ in range(2 * m)))
    # refs: partials [S, M, N]; or (fixup) [residual], counters in, out [M, N], workspace [S, M, N], counters
    o_ref, fix_refs = (refs[-3], (None, refs[0] if has_residual else None, refs[-2], refs[-1])) if fixup else \
        (refs[0], None)
    ncol = pl.num_programs(0)
    for h in range(2):  # low-nibble columns, then high (their own counters: tiles ncol..2 ncol - 1)
        _finish_splits([jnp.sum(accs[2 * r + h], axis=0) for r in range(m)], o_ref, fix_refs, col + h * half, cmask,
                       splits=splits, counter_tile=pl.program_id(0) + h * ncol, barrier=not interpret)


def matvec_q4(x: jax.Array, q: jax.Array, scales: jax.Array, zeros: jax.Array | None = None, *, n: int,
              offset: int = 8, blocks: Blocks | None = None, interpret: bool = False,
              out_dtype=jnp.float32, norm_scale: jax.Array | None = None, eps: float = 1e-5, norm_offset: float = 0.0,
              glu: str | None = None, residual: jax.Array | None = None) -> jax.Array:
    """x [M, K] @ W [K, N] -> [M, N] in `out_dtype` (fp32 accumulation) for W stored `u4x2` (q uint8 [K, N/2])
    with scales (and zeros) [K / group, N]; `offset` is subtracted from the codes of symmetric weights (zeros None).
    norm_scale / eps / norm_offset, glu and residual: as `gpu.matvec`'s (norm_offset is its `offset`)."""
    m = x.shape[0]
    k = q.shape[0]
    groups = scales.shape[0]
    if q.shape != (k, n // 2) or scales.shape[1] != n or k % groups or x.shape[1] != k * (2 if glu else 1):
        raise ValueError(f"matvec_q4: x [M, K{' * 2 (glu)' if glu else ''}], q [K, N/2] = {(k, n // 2)}, scales "
                         f"[groups, {n}]; got x {tuple(x.shape)}, q {tuple(q.shape)}, scales {tuple(scales.shape)}")
    if why := q4_supported(k, n, groups):
        raise ValueError(f"matvec_q4: {why}")
    if glu is not None and (glu not in GLUS or norm_scale is not None):
        raise ValueError(f"matvec_q4: glu must be one of {GLUS}, without norm_scale; got {glu!r}")
    if norm_scale is not None and norm_scale.shape != (k,):
        raise ValueError(f"matvec_q4: norm_scale has shape {tuple(norm_scale.shape)}, expected ({k},)")
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"matvec_q4: residual has shape {tuple(residual.shape)}, expected {(m, n)}")
    blocks = resolve_fixup(blocks or blocks_for(k, n, f"u4g{k // groups}"))
    norm = None if norm_scale is None else (float(eps), float(norm_offset))
    return _matvec_q4(x, q, scales, zeros, norm_scale, residual, n=n, offset=int(offset), blocks=blocks,
                      interpret=interpret, out_dtype=jnp.dtype(out_dtype), norm=norm, glu=glu)


@functools.partial(jax.jit, static_argnames=("n", "offset", "blocks", "interpret", "out_dtype", "norm", "glu"))
def _matvec_q4(x, q, scales, zeros, norm_scale, residual, *, n: int, offset: int, blocks: Blocks, interpret: bool,
               out_dtype, norm, glu):
    m = x.shape[0]
    k = q.shape[0]
    group = k // scales.shape[0]
    half = n // 2
    # bk divides the (power-of-two) group, and splits hold whole bk tiles: no tile straddles two groups
    bk, bn, ncol, ks, splits = _plan(blocks, m, k, half, _pow2_at_most(group))
    kernel = functools.partial(_q4_kernel, m=m, k=k, half=half, ks=ks, bk=bk, bn=bn, group=group,
                               offset=offset, has_zeros=zeros is not None, convert=blocks.convert,
                               fixup=blocks.fixup, splits=splits, interpret=bool(interpret), norm=norm, glu=glu,
                               has_residual=residual is not None)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    if norm_scale is None:
        norm_scale = jnp.zeros((1,), x.dtype)  # unread placeholder
    args = (x, q, scales, scales if zeros is None else zeros, norm_scale.astype(x.dtype))
    if not blocks.fixup:
        partial = pl.pallas_call(
            kernel, grid=(ncol, splits), out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
            compiler_params=params, interpret=interpret, name="flashit_matvec_q4",
        )(*args)
        y = (partial.sum(axis=0) if splits > 1 else partial[0]).astype(out_dtype)
        return y if residual is None else (residual.astype(jnp.float32) + y.astype(jnp.float32)).astype(out_dtype)
    extra = () if residual is None else (residual,)
    counters = jnp.zeros((2 * ncol,), jnp.int32)  # low and high halves' column tiles, all 0 (and left 0)
    y, _, _ = pl.pallas_call(
        kernel, grid=(ncol, splits),
        out_shape=[jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
                   jax.ShapeDtypeStruct((2 * ncol,), jnp.int32)],
        input_output_aliases={len(args) + len(extra): 2}, compiler_params=params, interpret=interpret,
        name="flashit_matvec_q4_fixup",
    )(*args, *extra, counters)
    return y
