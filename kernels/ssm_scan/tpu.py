"""Selective scan as Pallas TPU (Mosaic) kernels, forward and backward (custom_vjp).

Grid (batch, head, channel block, time block); the time axis is sequential ("arbitrary") and
the state [N, block_p] (N sublanes x channels on lanes) lives in a VMEM scratch across it, so
HBM sees each input and output once while BlockSpecs double-buffer the next time block.
Inside a time block the steps run in a loop over sub-chunks of `chunk` steps:
x_t and Δ_t are rows of the [T, block_p] block; B and C arrive transposed ([N, T] blocks), and
the column of step t is picked with a lane mask and a lane reduction (no dynamic lane slicing).

Backward mirrors the GPU kernel: the training forward writes the state every `chunk` steps,
the backward walks time blocks and sub-chunks in reverse, recomputes `chunk` states in vregs
and runs the adjoint recurrence through them. Partial dB/dC per channel block are summed by
the wrapper; dA and dD accumulate in resident output blocks across the time axis.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
    block_p: int = 128  # channels per program (lanes): a multiple of 128, or all of P
    time_block: int = 128  # steps per grid step (a multiple of 128 unless it covers all of L)
    chunk: int = 8  # steps recomputed in registers by the backward; checkpoint interval


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _geometry(l: int, p: int, blocks: TpuBlocks):
    """(padded L, time block, padded P, channel block)."""
    k = blocks.chunk
    lk = _round_up(l, k)
    if lk <= blocks.time_block:
        lp, tb = lk, lk
    else:
        tb = _round_up(blocks.time_block, k)
        lp = _round_up(l, tb)
    if p <= blocks.block_p:
        pp, bp = p, p
    else:
        bp = blocks.block_p
        pp = _round_up(p, bp)
    return lp, tb, pp, bp


def _column(mat, lane, t):
    """Column t of an [N, T] tile as [N, 1]."""
    return jnp.sum(jnp.where(lane == t, mat, 0.0), axis=1, keepdims=True)


def _fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, h0_ref, y_ref, hT_ref, *rest, chunk, save):
    f32 = jnp.float32
    ck_ref = rest[0] if save else None
    h_scr = rest[-1]
    li = pl.program_id(3)

    @pl.when(li == 0)
    def _():
        h_scr[...] = h0_ref[...]

    a = a_ref[...]
    dd = d_ref[...]
    bmat, cmat = b_ref[...].astype(f32), c_ref[...].astype(f32)
    lane = jax.lax.broadcasted_iota(jnp.int32, bmat.shape, 1)
    tb = x_ref.shape[0]

    def sub(s, h):
        if save:
            ck_ref[s] = h
        for k in range(chunk):
            t = s * chunk + k
            xt = x_ref[pl.ds(t, 1), :].astype(f32)
            dtt = dt_ref[pl.ds(t, 1), :].astype(f32)
            h = jnp.exp(dtt * a) * h + (dtt * xt) * _column(bmat, lane, t)
            y = jnp.sum(h * _column(cmat, lane, t), axis=0, keepdims=True) + dd * xt
            y_ref[pl.ds(t, 1), :] = y.astype(y_ref.dtype)
        return h

    h = jax.lax.fori_loop(0, tb // chunk, sub, h_scr[...])
    h_scr[...] = h

    @pl.when(li == pl.num_programs(3) - 1)
    def _():
        hT_ref[...] = h


def _bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, ck_ref, dy_ref, dhT_ref,
                dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref, dh0_ref, g_scr, *, chunk):
    f32 = jnp.float32
    li = pl.program_id(3)

    @pl.when(li == 0)
    def _():
        g_scr[...] = dhT_ref[...]
        da_ref[...] = jnp.zeros(da_ref.shape, f32)
        dd_ref[...] = jnp.zeros(dd_ref.shape, f32)

    a = a_ref[...]
    dd = d_ref[...]
    bmat, cmat = b_ref[...].astype(f32), c_ref[...].astype(f32)
    lane = jax.lax.broadcasted_iota(jnp.int32, bmat.shape, 1)
    tb = x_ref.shape[0]
    n_sub = tb // chunk
    db_ref[...] = jnp.zeros(db_ref.shape, f32)
    dc_ref[...] = jnp.zeros(dc_ref.shape, f32)

    def sub(j, carry):
        gh, dA, dD = carry
        s = n_sub - 1 - j
        hs = [ck_ref[s]]
        xs, dts, bs = [], [], []
        for k in range(chunk):
            t = s * chunk + k
            xt = x_ref[pl.ds(t, 1), :].astype(f32)
            dtt = dt_ref[pl.ds(t, 1), :].astype(f32)
            bcol = _column(bmat, lane, t)
            hs.append(jnp.exp(dtt * a) * hs[-1] + (dtt * xt) * bcol)
            xs.append(xt), dts.append(dtt), bs.append(bcol)
        for k in reversed(range(chunk)):
            t = s * chunk + k
            xt, dtt, bcol = xs[k], dts[k], bs[k]
            dy = dy_ref[pl.ds(t, 1), :].astype(f32)
            g = gh + dy * _column(cmat, lane, t)
            at_t = lane == t
            dc_ref[...] += jnp.where(at_t, jnp.sum(dy * hs[k + 1], axis=1, keepdims=True), 0.0)
            db_ref[...] += jnp.where(at_t, jnp.sum(g * (dtt * xt), axis=1, keepdims=True), 0.0)
            du = jnp.sum(g * bcol, axis=0, keepdims=True)
            decay = jnp.exp(dtt * a)
            sg = g * hs[k] * decay
            dx_ref[pl.ds(t, 1), :] = (du * dtt + dd * dy).astype(dx_ref.dtype)
            ddt_ref[pl.ds(t, 1), :] = (du * xt + jnp.sum(sg * a, axis=0, keepdims=True)).astype(ddt_ref.dtype)
            dA = dA + sg * dtt
            dD = dD + dy * xt
            gh = decay * g
        return gh, dA, dD

    zero_a = jnp.zeros(a.shape, f32)
    gh, dA, dD = jax.lax.fori_loop(0, n_sub, sub, (g_scr[...], zero_a, jnp.zeros(dd.shape, f32)))
    g_scr[...] = gh
    da_ref[...] += dA
    dd_ref[...] += dD

    @pl.when(li == pl.num_programs(3) - 1)
    def _():
        dh0_ref[...] = gh


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(x, dt, At, Bt, Ct, D3, h0T, geo, blocks, interpret, save):
    bt, lp, h, pp = x.shape
    g, n = Bt.shape[1], Bt.shape[2]
    _, tb, _, bp = geo
    hpg, k = h // g, blocks.chunk
    nl = lp // tb
    grid = (bt, h, pp // bp, nl)
    row = pl.BlockSpec((None, tb, None, bp), lambda b, hh, p, l: (b, l, hh, p))
    in_specs = [row, row,
                pl.BlockSpec((None, n, bp), lambda b, hh, p, l: (hh, 0, p)),
                pl.BlockSpec((None, None, n, tb), lambda b, hh, p, l: (b, hh // hpg, 0, l)),
                pl.BlockSpec((None, None, n, tb), lambda b, hh, p, l: (b, hh // hpg, 0, l)),
                pl.BlockSpec((None, 1, bp), lambda b, hh, p, l: (hh, 0, p)),
                pl.BlockSpec((None, None, n, bp), lambda b, hh, p, l: (b, hh, 0, p))]
    state = pl.BlockSpec((None, None, n, bp), lambda b, hh, p, l: (b, hh, 0, p))
    out_specs = [row, state]
    outs = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((bt, h, n, pp), jnp.float32)]
    if save:
        out_specs.append(pl.BlockSpec((None, None, tb // k, n, bp), lambda b, hh, p, l: (b, hh, l, 0, p)))
        outs.append(jax.ShapeDtypeStruct((bt, h, lp // k, n, pp), jnp.float32))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=k, save=save), out_shape=tuple(outs), grid=grid,
        in_specs=in_specs, out_specs=tuple(out_specs), scratch_shapes=[pltpu.VMEM((n, bp), jnp.float32)],
        compiler_params=_params(), interpret=interpret, name="ssm_scan_fwd_tpu")(x, dt, At, Bt, Ct, D3, h0T)


def _backward(x, dt, At, Bt, Ct, D3, ck, dy, dhT, geo, blocks, interpret):
    bt, lp, h, pp = x.shape
    g, n = Bt.shape[1], Bt.shape[2]
    _, tb, _, bp = geo
    hpg, k = h // g, blocks.chunk
    nl, npb = lp // tb, pp // bp
    f32 = jnp.float32
    grid = (bt, h, npb, nl)
    row = pl.BlockSpec((None, tb, None, bp), lambda b, hh, p, l: (b, nl - 1 - l, hh, p))
    bc = pl.BlockSpec((None, None, n, tb), lambda b, hh, p, l: (b, hh // hpg, 0, nl - 1 - l))
    state = pl.BlockSpec((None, None, n, bp), lambda b, hh, p, l: (b, hh, 0, p))
    part = pl.BlockSpec((None, None, None, n, tb), lambda b, hh, p, l: (b, hh, p, 0, nl - 1 - l))
    in_specs = [row, row, pl.BlockSpec((None, n, bp), lambda b, hh, p, l: (hh, 0, p)), bc, bc,
                pl.BlockSpec((None, 1, bp), lambda b, hh, p, l: (hh, 0, p)),
                pl.BlockSpec((None, None, tb // k, n, bp), lambda b, hh, p, l: (b, hh, nl - 1 - l, 0, p)),
                row, state]
    out_specs = (row, row, part, part, state, pl.BlockSpec((None, None, 1, bp), lambda b, hh, p, l: (b, hh, 0, p)),
                 state)
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(dt.shape, dt.dtype),
            jax.ShapeDtypeStruct((bt, h, npb, n, lp), f32), jax.ShapeDtypeStruct((bt, h, npb, n, lp), f32),
            jax.ShapeDtypeStruct((bt, h, n, pp), f32), jax.ShapeDtypeStruct((bt, h, 1, pp), f32),
            jax.ShapeDtypeStruct((bt, h, n, pp), f32))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=k), out_shape=outs, grid=grid, in_specs=in_specs,
        out_specs=out_specs, scratch_shapes=[pltpu.VMEM((n, bp), f32)], compiler_params=_params(),
        interpret=interpret, name="ssm_scan_bwd_tpu")(x, dt, At, Bt, Ct, D3, ck, dy, dhT.astype(f32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _scan(x, dt, At, Bt, Ct, D3, h0T, geo, blocks, interpret):
    y, hT = _forward(x, dt, At, Bt, Ct, D3, h0T, geo, blocks, interpret, save=False)
    return y, hT


def _scan_fwd(x, dt, At, Bt, Ct, D3, h0T, geo, blocks, interpret):
    y, hT, ck = _forward(x, dt, At, Bt, Ct, D3, h0T, geo, blocks, interpret, save=True)
    return (y, hT), (x, dt, At, Bt, Ct, D3, ck)


def _scan_bwd(geo, blocks, interpret, res, cts):
    x, dt, At, Bt, Ct, D3, ck = res
    dy, dhT = cts
    dx, ddt, db, dc, da, dd, dh0 = _backward(x, dt, At, Bt, Ct, D3, ck, dy, dhT, geo, blocks, interpret)
    bt, h, npb, n, lp = db.shape
    g = Bt.shape[1]
    db = db.reshape(bt, g, (h // g) * npb, n, lp).sum(2).astype(Bt.dtype)
    dc = dc.reshape(bt, g, (h // g) * npb, n, lp).sum(2).astype(Ct.dtype)
    return dx, ddt, da.sum(0), db, dc, dd.sum(0), dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def scan_canonical(x, dt, A, B, C, D, h0, *, blocks: TpuBlocks = TpuBlocks(), interpret=False):
    """Canonical layout (see reference.py) in, (y, final state [Bt, H, P, N] fp32) out.

    `interpret`: False on a TPU, or `pltpu.InterpretParams()` (or True) to run on CPU.
    """
    bt, l, h, p = x.shape
    out_dtype = x.dtype
    # 32-bit rows keep the dynamic single-row (sublane) loads and stores unpacked
    x, dt, B, C = (a.astype(jnp.float32) for a in (x, dt, B, C))
    geo = _geometry(l, p, blocks)
    lp, _, pp, _ = geo
    pad_l, pad_p = lp - l, pp - p
    At, h0T = jnp.swapaxes(A, 1, 2), jnp.swapaxes(h0, 2, 3)
    Bt, Ct = jnp.moveaxis(B, 1, 3), jnp.moveaxis(C, 1, 3)  # [Bt, G, N, L]
    if pad_l:  # Δ = 0 and x = 0 past the end leave the state unchanged
        x, dt = (jnp.pad(a, [(0, 0), (0, pad_l), (0, 0), (0, 0)]) for a in (x, dt))
        Bt, Ct = (jnp.pad(a, [(0, 0), (0, 0), (0, 0), (0, pad_l)]) for a in (Bt, Ct))
    if pad_p:
        x, dt = (jnp.pad(a, [(0, 0), (0, 0), (0, 0), (0, pad_p)]) for a in (x, dt))
        At = jnp.pad(At, [(0, 0), (0, 0), (0, pad_p)])
        D = jnp.pad(D, [(0, 0), (0, pad_p)])
        h0T = jnp.pad(h0T, [(0, 0), (0, 0), (0, 0), (0, pad_p)])
    y, hT = _scan(x, dt, At, Bt, Ct, D[:, None, :], h0T, geo, blocks, interpret)
    return y[:, :l, :, :p].astype(out_dtype), jnp.swapaxes(hT, 2, 3)[:, :, :p]
