"""Pallas (Triton-lowered) GEMV kernels for batch-1..8 decoding.

A decode step is a chain of matrix-vector products that must stream every weight once, so
speed is bytes per second. XLA's GEMM emitters tile for large M and leave most of the chip
idle at M = 1 when N is small (few column blocks). These kernels split K as well as N so that
several hundred programs stream the weight concurrently; each program accumulates an
elementwise [bk, bn] fp32 tile (no cross-thread reduction inside the loop) and reduces once.
The K-split partial sums ([S, M, N] fp32, well under 2% of the weight's bytes) are added by XLA.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


CONVERTS = ("magic", "cvt")  # Blocks.convert: see int_to_f32


@dataclasses.dataclass(frozen=True)
class Blocks:
    bk: int = 64  # rows of W per iteration (the reduced axis)
    bn: int = 128  # columns of W per program
    target_programs: int = 528  # ~4 per SM on an H100 (132 SMs)
    num_warps: int = 4
    num_stages: int | None = None  # Triton's software pipelining of the K loop (None: its default)
    # integer codes to fp32: "magic" builds the float from its bits (int_to_f32), "cvt" is the plain
    # conversion instruction; only int8 / 4-bit weights read it
    convert: str = "magic"
    # carry the next K tile's load across the loop (issued before this tile's arithmetic), so each warp has
    # two tiles of loads in flight; costs the tile's registers (matvec only)
    prefetch: bool = False
    # K splits summed inside the kernel: each program stores its partial sums, counts itself in per-column
    # counters (block barrier, then one atomic add per column tile), and the last of a tile's splits adds
    # the partials in split order, applies the per-column scale and writes the output dtype (deterministic).
    # Off: XLA sums the [S, M, N] fp32 partials, scales and converts them: one to three more kernels per
    # product (a w8 decode step on an H200 spent 154 us of its 1016 in such reduce/convert kernels,
    # 2026-12-05, some of them likely the unfused norm's). Not timed yet, so off by default;
    # FLASHIT_JAX_GEMV_FIXUP=1/0 overrides it for every shape (benchmarks).
    fixup: bool = False

    def __post_init__(self):
        if self.convert not in CONVERTS:
            raise ValueError(f"Blocks.convert must be one of {CONVERTS}, got {self.convert!r}")


TUNED_FILE = pathlib.Path(__file__).with_name("tuned.json")


def _device_kind() -> str:
    return jax.devices()[0].device_kind


@functools.cache
def tuned(device_kind: str | None = None) -> dict[tuple[str, int, int], Blocks]:
    """Best blocks per (weight format, K, N) for this device kind, written by
    `python -m kernels.gemv.bench --tune --write [--weights FMT]` (each table says its date); keys
    are "KxN" for bf16 weights and "FMT:KxN" for others ("i8", "u4g128", ...; "t": the transposed GEMV
    `matvec_t` of a tied head, K = dim, N = vocab). Shapes missing
    from this device's table come from the first table, then from the defaults."""
    if not TUNED_FILE.exists():
        return {}
    fields = {f.name for f in dataclasses.fields(Blocks)}
    try:
        devices = json.loads(TUNED_FILE.read_text())["devices"]
        first = next(iter(devices.values()), {"blocks": {}})["blocks"]
        table = {**first, **devices.get(device_kind or _device_kind(), {"blocks": {}})["blocks"]}
        out = {}
        for key, b in table.items():
            fmt, _, shape = key.rpartition(":")
            k, n = (int(v) for v in shape.split("x"))
            out[(fmt or "bf16", k, n)] = Blocks(**{f: b[f] for f in fields if f in b})
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{TUNED_FILE} is corrupt ({type(e).__name__}: {e}); rewrite it with "
                         "python -m kernels.gemv.bench --tune --write, or delete it to use the default blocks") from None


# untuned tiles per format: the tied head's (bn = vocab rows per program, bk = features per step), and the
# 4-bit kernel's (bf16 blocks halved along K: each row keeps two accumulators, low and high nibble columns)
DEFAULT_T_BLOCKS = Blocks(bk=128, bn=64, num_warps=4)
DEFAULT_Q4_BLOCKS = Blocks(bk=128, bn=64, target_programs=528, num_warps=4)


def blocks_for(k: int, n: int, fmt: str = "bf16", default: Blocks | None = None) -> Blocks:
    """Tuned blocks for a [K, N] weight in format `fmt` ("bf16" for any float weight, "i8", "u4g<group>",
    "t"); untuned: `default`, else the format's own (int8 falls back to the bf16 table of its shape)."""
    table = tuned()
    if (fmt, k, n) in table:
        return table[(fmt, k, n)]
    if default is not None:
        return default
    if fmt == "i8":
        return table.get(("bf16", k, n), Blocks())
    if fmt == "t":
        return DEFAULT_T_BLOCKS
    return DEFAULT_Q4_BLOCKS if fmt.startswith("u4") else Blocks()


_TWO23_BITS = 0x4B000000  # the fp32 2^23: with an integer 0 <= i < 2^23 in its mantissa bits it is exactly 2^23 + i


def int_to_f32(v: jax.Array, *, offset: float = 0.0, convert: str = "magic") -> jax.Array:
    """Integer codes as exact fp32 values minus `offset`: int8 (signed) or non-negative int32 below 2^23.

    "magic" avoids the int-to-float conversion instruction, which Hopper issues at 16 results per
    clock per SM (a quarter of integer and an eighth of fp32 arithmetic; CUDA guide, throughput
    table): a 33 MB int8 matrix spends ~8 us of an H200 in conversions alone, about what reading it
    takes. Instead one integer add (or OR) puts the code in the mantissa of 2^23 and one fp32
    subtraction removes the 2^23 (and the offset): exact for every code, same values as "cvt"."""
    if convert == "cvt":
        out = v.astype(jnp.float32)
        return out - offset if offset else out
    if convert != "magic":
        raise ValueError(f"convert must be one of {CONVERTS}, got {convert!r}")
    if v.dtype == jnp.int8:  # -128..127 -> 2^23 + (v + 128)
        bits, base = v.astype(jnp.int32) + (_TWO23_BITS + 128), 8388608.0 + 128.0
    else:
        bits, base = v.astype(jnp.int32) | _TWO23_BITS, 8388608.0
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - (base + offset)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_at_least(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _plan(blocks: Blocks, m: int, k: int, n: int, bk_cap: int, programs: int | None = None):
    """(bk, bn, column tiles, rows per K split, K splits) for an M-row GEMV over [k, n] tiles: enough
    programs (`programs`, default `target_programs`) that many stream the weight at once; each
    split's rows are a multiple of bk (<= bk_cap)."""
    bk = min(max(16, blocks.bk // _pow2_at_least(m)), bk_cap)
    bn = min(blocks.bn, max(16, _pow2_at_most(n)))
    ncol = pl.cdiv(n, bn)
    splits = max(1, min(pl.cdiv(programs or blocks.target_programs, ncol), pl.cdiv(k, bk)))
    ks = pl.cdiv(pl.cdiv(k, splits), bk) * bk
    return bk, bn, ncol, ks, pl.cdiv(k, ks)


def _finish_splits(parts, o_ref, fix_refs, col, cmask, *, splits: int, counter_tile=None, barrier: bool = True):
    """Write a program's per-row sums `parts` ([bn] fp32 each): as partials o_ref [S, M, N] (XLA adds them),
    or with `fix_refs` = (column scale [N] or None, residual [M, N] or None, workspace [S, M, N] fp32, counters
    [column tiles] int32, all zero): the final o_ref [M, N] (residual + y if given), by whichever split of
    each column tile finishes last (Blocks.fixup).
    counter_tile: which counter these columns use (default: the program's column tile). barrier=False
    only in Pallas' interpreter, which has no barrier (and runs programs one after another)."""
    split = pl.program_id(1)
    if fix_refs is None:
        for r, part in enumerate(parts):
            plgpu.store(o_ref.at[split, r, col], part, mask=cmask)
        return
    scale_ref, res_ref, ws_ref, cnt_ref = fix_refs
    scale = None if scale_ref is None else plgpu.load(scale_ref.at[col], mask=cmask, other=0.0).astype(jnp.float32)

    def put(r, total, mask):
        y = (total if scale is None else total * scale).astype(o_ref.dtype)
        if res_ref is not None:  # residual + y, y rounded first: what `x + linear(...)` computes
            y = (plgpu.load(res_ref.at[r, col], mask=mask, other=0.0).astype(jnp.float32)
                 + y.astype(jnp.float32)).astype(o_ref.dtype)
        plgpu.store(o_ref.at[r, col], y, mask=mask)

    if splits == 1:
        for r, part in enumerate(parts):
            put(r, part, cmask)
        return
    for r, part in enumerate(parts):
        plgpu.store(ws_ref.at[split, r, col], part, mask=cmask)
    # One counter per column tile, bumped by one scalar atomic (one thread; a [bn] atomic in a layout that
    # holds each column in several threads bumped it several times on an H100, 2026-12-05). The block
    # barrier first makes that thread's release (gpu scope) cover every store of the program, the CUDA
    # split-K pattern (__syncthreads, fence, atomicAdd); its acquire orders the loads below.
    if barrier:
        plgpu.debug_barrier()
    tile = pl.program_id(0) if counter_tile is None else counter_tile
    before = plgpu.atomic_add(cnt_ref, tile, jnp.int32(1))
    done = before == splits - 1
    last = cmask & done
    for r in range(len(parts)):
        total = plgpu.load(ws_ref.at[0, r, col], mask=last, other=0.0)
        for s in range(1, splits):  # split order: the same sum whichever program finishes last
            total = total + plgpu.load(ws_ref.at[s, r, col], mask=last, other=0.0)
        put(r, total, last)
    # zero again on exit (no other program touches this counter once the last one has counted)
    plgpu.store(cnt_ref.at[pl.ds(tile, 1)], jnp.zeros((1,), jnp.int32), mask=jnp.broadcast_to(done, (1,)))


def _silu_glu(g, u, dtype):
    """silu(g) * u rounded as XLA computes `jax.nn.silu(g) * u` in `dtype` (each op's result rounded)."""
    def rnd(v):
        return v.astype(dtype).astype(jnp.float32)

    g, u = g.astype(jnp.float32), u.astype(jnp.float32)
    return rnd(rnd(g * rnd(1.0 / (1.0 + jnp.exp(-g)))) * u)


def _x_prologue(x_ref, s_ref, *, m: int, k: int, norm: tuple[float, float] | None, glu: str | None):
    """fn(rows, rmask) -> the product's input at K rows `rows` of each of the m rows of x, fp32 [bk] each:
    x itself; rms_norm(x) with the scale in s_ref (norm = (eps, offset)); or silu(gate) * up (glu, x = gate | up),
    rounded to x's dtype as the XLA expressions they replace round them."""
    if norm is not None:  # RMSNorm of each row, recomputed per program: x is a few KB in L2
        eps, offset = norm
        kp = 1 << (k - 1).bit_length()
        allk = jnp.arange(kp)
        inv = []
        for r in range(m):
            xs = plgpu.load(x_ref.at[r, allk], mask=allk < k, other=0.0).astype(jnp.float32)
            inv.append(jax.lax.rsqrt(jnp.sum(xs * xs) / k + eps))

    def rows_in(rows, rmask):
        if norm is not None:
            scale = plgpu.load(s_ref.at[rows], mask=rmask, other=0.0).astype(jnp.float32) + offset
        out = []
        for r in range(m):
            xr = plgpu.load(x_ref.at[r, rows], mask=rmask, other=0.0)
            if glu is not None:
                xr = _silu_glu(xr, plgpu.load(x_ref.at[r, rows + k], mask=rmask, other=0.0), x_ref.dtype)
            elif norm is None:
                xr = xr.astype(jnp.float32)
            else:  # rounded to x's dtype as nn.rms_norm returns it, so both paths multiply the same values
                xr = ((xr.astype(jnp.float32) * inv[r]) * scale).astype(x_ref.dtype).astype(jnp.float32)
            out.append(xr)
        return out

    return rows_in


def _matvec_kernel(x_ref, w_ref, s_ref, *refs, m: int, k: int, n: int, ks: int, bk: int, bn: int,
                   norm: tuple[float, float] | None, convert: str, prefetch: bool, fixup: bool, has_scale: bool,
                   has_residual: bool, glu: str | None, splits: int, interpret: bool):
    # refs: partials [S, M, N]; or (fixup) [column scale], [residual], counters in; then out [M, N], workspace,
    # counters. glu="silu": x_ref is [M, 2K], gate | up, and the product's input is silu(gate) * up.
    if fixup:
        o_ref, ws_ref, cnt_ref = refs[-3:]
        fix_refs = (refs[0] if has_scale else None, refs[int(has_scale)] if has_residual else None, ws_ref, cnt_ref)
    else:
        o_ref, fix_refs = refs[0], None
    col = pl.program_id(0) * bn + jnp.arange(bn)
    cmask = col < n
    k0 = pl.program_id(1) * ks
    x_rows = _x_prologue(x_ref, s_ref, m=m, k=k, norm=norm, glu=glu)

    def rows_of(i):  # K tile i of this program's range: its rows and which of them exist
        rows = k0 + i * bk + jnp.arange(bk)
        return rows, rows < jnp.minimum(k, k0 + ks)

    def tile(i):
        rows, rmask = rows_of(i)
        return plgpu.load(w_ref.at[rows[:, None], col[None, :]], mask=rmask[:, None] & cmask[None, :], other=0)

    def accumulate(i, w, accs):
        rows, rmask = rows_of(i)
        # bf16/fp16/fp32 weights, or int8 codes (qmatmul's W8)
        w = int_to_f32(w, convert=convert) if w.dtype == jnp.int8 else w.astype(jnp.float32)
        return tuple(acc + xr[:, None] * w for acc, xr in zip(accs, x_rows(rows, rmask)))

    steps = pl.cdiv(ks, bk)
    zeros = tuple(jnp.zeros((bk, bn), jnp.float32) for _ in range(m))
    if prefetch:  # tile i + 1's load is issued before tile i's arithmetic: two tiles in flight per warp
        def body(i, carry):
            nxt = tile(i + 1)  # past the K range: fully masked, no memory traffic
            return (*accumulate(i, carry[-1], carry[:-1]), nxt)

        accs = jax.lax.fori_loop(0, steps, body, (*zeros, tile(0)))[:-1]
    else:
        accs = jax.lax.fori_loop(0, steps, lambda i, a: accumulate(i, tile(i), a), zeros)
    _finish_splits([jnp.sum(accs[r], axis=0) for r in range(m)], o_ref, fix_refs, col, cmask, splits=splits,
                   barrier=not interpret)


def _matvec_t_kernel(x_ref, e_ref, o_ref, *, m: int, d: int, v: int, bv: int, bd: int):
    rows = pl.program_id(0) * bv + jnp.arange(bv)
    rmask = rows < v

    def body(i, accs):
        cols = i * bd + jnp.arange(bd)
        cmask = cols < d
        e = plgpu.load(e_ref.at[rows[:, None], cols[None, :]], mask=rmask[:, None] & cmask[None, :],
                       other=0.0).astype(jnp.float32)
        out = []
        for r in range(m):
            xr = plgpu.load(x_ref.at[r, cols], mask=cmask, other=0.0).astype(jnp.float32)
            out.append(accs[r] + e * xr[None, :])
        return tuple(out)

    accs = jax.lax.fori_loop(0, pl.cdiv(d, bd), body, tuple(jnp.zeros((bv, bd), jnp.float32) for _ in range(m)))
    for r in range(m):
        plgpu.store(o_ref.at[r, rows], jnp.sum(accs[r], axis=1), mask=rmask)


def fixup_override() -> bool | None:
    """FLASHIT_JAX_GEMV_FIXUP=1/0 forces Blocks.fixup on/off for every shape (A/B benchmarks); unset: None."""
    v = os.environ.get("FLASHIT_JAX_GEMV_FIXUP", "")
    if v not in ("", "0", "1"):
        raise ValueError(f"FLASHIT_JAX_GEMV_FIXUP must be 0 or 1, got {v!r}")
    return None if v == "" else v == "1"


def resolve_fixup(blocks: Blocks) -> Blocks:
    """`blocks` with FLASHIT_JAX_GEMV_FIXUP applied (every GEMV entry point). The in-kernel sum is off by
    default: on an H200 (2026-12-05, after its fix to one scalar atomic per column tile) it gave the same
    bits 20 calls in a row and XLA's values (tests/test_gemv.py::test_matvec_fixup_on_gpu) and the same
    decode tokens, but ran slower than XLA's sums of the partials (831 against 954 tokens/s for w8+emb8)."""
    force = fixup_override()
    if force is not None and force != blocks.fixup:
        blocks = dataclasses.replace(blocks, fixup=force)
    return blocks


GLUS = ("silu",)  # matvec(glu=...): gated activations computed in the kernel's prologue


def matvec(x: jax.Array, w: jax.Array, *, blocks: Blocks | None = None, interpret: bool = False,
           norm_scale: jax.Array | None = None, eps: float = 1e-5, offset: float = 0.0,
           out_scale: jax.Array | None = None, out_dtype=jnp.float32, glu: str | None = None,
           residual: jax.Array | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in `out_dtype` (fp32 accumulation) for small M (<= 8); w may hold
    int8 codes (converted in registers), with `out_scale` [N] their per-column scale (y * out_scale).

    With `norm_scale` [K]: rms_norm(x, norm_scale, eps, offset) @ w, the norm computed inside the
    kernel (a decode step then needs no separate normalisation kernels before its projections).
    glu="silu": x is [M, 2K] (gate | up) and the product is (silu(gate) * up) @ w, the activation computed
    in the kernel (the down projection of a gated MLP). residual [M, N]: residual + y (y rounded to
    out_dtype first, as `residual + linear(...)`); with Blocks.fixup inside the kernel."""
    m, k = x.shape
    n = w.shape[1]
    if glu is not None:
        if glu not in GLUS:
            raise ValueError(f"matvec: glu must be one of {GLUS}, got {glu!r}")
        if norm_scale is not None:
            raise ValueError("matvec: glu and norm_scale do not combine (the norm is the input of gate|up, not down)")
        if k != 2 * w.shape[0]:
            raise ValueError(f"matvec: glu={glu!r} takes x as [M, 2K] (gate | up) for w [K, N]; got x {tuple(x.shape)} "
                             f"and w {tuple(w.shape)}")
        k = w.shape[0]
    if w.shape[0] != k:
        raise ValueError(f"matvec: x has {k} features but w is {tuple(w.shape)} ([K, N])")
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"matvec: residual has shape {tuple(residual.shape)}, expected the output's {(m, n)}")
    if norm_scale is not None and norm_scale.shape != (k,):
        raise ValueError(f"matvec: norm_scale has shape {tuple(norm_scale.shape)}, expected ({k},) like x's features")
    if out_scale is not None and out_scale.size != n:
        raise ValueError(f"matvec: out_scale has shape {tuple(out_scale.shape)}, expected one scale per column ({n})")
    blocks = resolve_fixup(blocks or blocks_for(k, n, "i8" if w.dtype == jnp.int8 else "bf16"))
    # resolved here, outside the jit: its trace cache keys on the static arguments, not on the environment
    return _matvec(x, w, norm_scale, None if out_scale is None else out_scale.reshape(n), residual, blocks=blocks,
                   interpret=interpret, eps=float(eps), offset=float(offset), out_dtype=jnp.dtype(out_dtype), glu=glu)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret", "eps", "offset", "out_dtype", "glu"))
def _matvec(x, w, norm_scale, out_scale, residual, *, blocks: Blocks, interpret: bool, eps: float, offset: float,
            out_dtype, glu):
    m = x.shape[0]
    k, n = w.shape
    # each row keeps its own [bk, bn] fp32 accumulator in registers and the tuned tiles fill the
    # register file at M = 1, so M rows get 1/M of the K tile. Why: with M-row tiles a 5-row verify
    # pass of the Llama-3.2-1B shape cost 4.6 one-row steps on an H200 (2026-12-04), for the same
    # bytes; spilled registers are the likely cause (not yet profiled; `kernels.gemv.bench --rows`)
    bk, bn, ncol, ks, splits = _plan(blocks, m, k, n, _pow2_at_most(k))
    norm = None if norm_scale is None else (eps, offset)
    fixup = blocks.fixup
    kernel = functools.partial(_matvec_kernel, m=m, k=k, n=n, ks=ks, bk=bk, bn=bn, norm=norm, convert=blocks.convert,
                               prefetch=blocks.prefetch, fixup=fixup, has_scale=out_scale is not None,
                               has_residual=residual is not None, glu=glu, splits=splits, interpret=bool(interpret))
    if norm_scale is None:
        norm_scale = jnp.zeros((1,), x.dtype)  # unread placeholder
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    if not fixup:
        partial = pl.pallas_call(
            kernel, grid=(ncol, splits), out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
            compiler_params=params, interpret=interpret, name="flashit_matvec",
        )(x, w, norm_scale)
        y = partial.sum(axis=0) if splits > 1 else partial[0]
        if out_scale is not None:
            y = y * out_scale.astype(jnp.float32)
        y = y.astype(out_dtype)
        return y if residual is None else (residual.astype(jnp.float32) + y.astype(jnp.float32)).astype(out_dtype)
    scale_in = (() if out_scale is None else (out_scale,)) + (() if residual is None else (residual,))
    counters = jnp.zeros((ncol,), jnp.int32)  # start at 0 (the kernel leaves them at 0)
    y, _, _ = pl.pallas_call(
        kernel, grid=(ncol, splits),
        out_shape=[jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
                   jax.ShapeDtypeStruct((ncol,), jnp.int32)],
        input_output_aliases={3 + len(scale_in): 2}, compiler_params=params, interpret=interpret,
        name="flashit_matvec_fixup",
    )(x, w, norm_scale, *scale_in, counters)
    return y


@functools.partial(jax.jit, static_argnames=("bv", "bd", "num_warps", "interpret"))
def matvec_t(x: jax.Array, e: jax.Array, *, bv: int | None = None, bd: int | None = None, num_warps: int | None = None,
             interpret: bool = False) -> jax.Array:
    """x [M, D] @ e [V, D].T -> fp32 [M, V] for small M (<= 8). Unset tiles come from the tuned table
    (format "t": K = D, N = V; `kernels.gemv.bench --weights t`), else DEFAULT_T_BLOCKS."""
    m, d = x.shape
    v = e.shape[0]
    tb = blocks_for(d, v, "t")
    bv, bd, num_warps = bv or tb.bn, bd or tb.bk, num_warps or tb.num_warps
    bd = min(max(16, bd // _pow2_at_least(m)), _pow2_at_most(d))  # per-row accumulators, as in matvec
    kernel = functools.partial(_matvec_t_kernel, m=m, d=d, v=v, bv=bv, bd=bd)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(v, bv),), out_shape=jax.ShapeDtypeStruct((m, v), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps), interpret=interpret,
        name="flashit_matvec_t",
    )(x, e)
