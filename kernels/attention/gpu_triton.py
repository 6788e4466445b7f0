"""Flash attention (forward + backward) and flash-decoding for GPUs, Pallas lowered to Triton.

The portable GPU path (Ampere, Ada, Hopper without the Mosaic kernel, ROCm): every feature of
`reference.attention` except the explicit `mask`. Layout stays [B, T, H, D] (no transposes):
each program owns one (query block, batch, query head) and walks the key blocks in the range
that `common.kv_block_range` computed on the host, applying the element mask inside.

Backward is FlashAttention-2 style with two kernels, each with its own block sizes: dq walks
key blocks per query block; dk/dv walks, per key block and KV head, every query head of the
group and the query blocks that can see it (so GQA needs no reduction afterwards).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.attention import common
from kernels.attention.common import LOG2E, MASK_VALUE, allowed, cdiv, dot, next_pow2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: forward, dq and dk/dv kernels each have their own."""

    block_q: int = 64
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "BlockSizes":
        if head_dim <= 64:
            return cls(block_q=128, block_k=64, num_warps=4, num_stages=3,
                       block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64)
        if head_dim <= 128:
            return cls(block_q=128, block_k=64, num_warps=8, num_stages=3,
                       block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64, num_warps_bwd=8)
        return cls(block_q=64, block_k=32, num_warps=8, num_stages=2,
                   block_q_dq=32, block_k_dq=32, block_q_dkv=32, block_k_dkv=32, num_warps_bwd=8)

    def fit(self, tq: int, tk: int) -> "BlockSizes":
        """Shrink blocks for short sequences (Triton needs powers of two, dots need >= 16)."""
        fq = lambda b: min(b, max(16, next_pow2(tq)))  # noqa: E731
        fk = lambda b: min(b, max(16, next_pow2(tk)))  # noqa: E731
        return dataclasses.replace(
            self, block_q=fq(self.block_q), block_k=fk(self.block_k), block_q_dq=fq(self.block_q_dq),
            block_k_dq=fk(self.block_k_dq), block_q_dkv=fq(self.block_q_dkv), block_k_dkv=fk(self.block_k_dkv))


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    blocks: BlockSizes
    interpret: bool


# ----------------------------------------------------------------------------- kernels
def _logits(q, k, scale, softcap, precise):
    """Base-2 logits [bq, bk] and the softcap's tanh (for the backward), fp32."""
    s = dot(q, k, trans_b=True, precise=precise) * scale
    t = None
    if softcap is not None:
        t = jnp.tanh(s / softcap)
        s = softcap * t
    return s * LOG2E, t


def _fwd_kernel(lo_ref, hi_ref, kvlen_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
                *, st: _Static, block_k: int):
    q = q_ref[...]
    bq, d = q.shape
    precise = q.dtype == jnp.float32
    kv_len = kvlen_ref[()]
    qpos = qpos_ref[...][:, None]
    qseg = None if qseg_ref is None else qseg_ref[...][:, None]

    def body(j, carry):
        acc, m, l = carry
        ks = pl.ds(j * block_k, block_k)
        s, _ = _logits(q, k_ref[ks, :], st.scale, st.softcap, precise)
        kpos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :]
        ok = allowed(qpos, kpos, kv_len, causal=st.causal, window=st.window, qseg=qseg,
                     kseg=None if kseg_ref is None else kseg_ref[ks][None, :])
        s = jnp.where(ok, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(ok, jnp.exp2(s - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precise=precise)
        return acc, m_new, l

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(lo_ref[()], hi_ref[()], body, init)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _bwd_tile(q, k, v, do, lse2, delta, qpos, kpos, kv_len, qseg, kseg, st: _Static, precise):
    """p and d(logits before scale) for one [bq, bk] tile."""
    s, t = _logits(q, k, st.scale, st.softcap, precise)
    ok = allowed(qpos, kpos, kv_len, causal=st.causal, window=st.window, qseg=qseg, kseg=kseg)
    p = jnp.where(ok, jnp.exp2(s - lse2[:, None]), 0.0)
    dp = dot(do, v, trans_b=True, precise=precise)
    ds = p * (dp - delta[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _dq_kernel(lo_ref, hi_ref, kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
               kseg_ref, dq_ref, *, st: _Static, block_k: int):
    q, do = q_ref[...], do_ref[...]
    precise = q.dtype == jnp.float32
    lse2, delta = lse_ref[...], delta_ref[...]
    kv_len = kvlen_ref[()]
    qpos = qpos_ref[...][:, None]
    qseg = None if qseg_ref is None else qseg_ref[...][:, None]

    def body(j, dq):
        ks = pl.ds(j * block_k, block_k)
        k = k_ref[ks, :]
        kpos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :]
        kseg = None if kseg_ref is None else kseg_ref[ks][None, :]
        _, ds = _bwd_tile(q, k, v_ref[ks, :], do, lse2, delta, qpos, kpos, kv_len, qseg, kseg, st, precise)
        return dq + dot(ds.astype(k.dtype), k, precise=precise)

    dq = lax.fori_loop(lo_ref[()], hi_ref[()], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
                kseg_ref, dk_ref, dv_ref, *, st: _Static, block_q: int, group: int):
    k, v = k_ref[...], v_ref[...]
    bk, d = k.shape
    precise = k.dtype == jnp.float32
    kv_len = kvlen_ref[()]
    kpos = pl.program_id(0) * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    kseg = None if kseg_ref is None else kseg_ref[...][None, :]
    lo, hi = lo_ref[()], hi_ref[()]

    def head(j, carry):
        def body(i, carry):
            dk, dv = carry
            qs = pl.ds(i * block_q, block_q)
            q, do = q_ref[qs, j, :], do_ref[qs, j, :]
            qseg = None if qseg_ref is None else qseg_ref[qs][:, None]
            p, ds = _bwd_tile(q, k, v, do, lse_ref[j, qs], delta_ref[j, qs], qpos_ref[qs][:, None], kpos, kv_len,
                              qseg, kseg, st, precise)
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True, precise=precise)
            dk = dk + dot(ds.astype(q.dtype), q, trans_a=True, precise=precise)
            return dk, dv

        return lax.fori_loop(lo, hi, body, carry)

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls
def _scalar_spec(rank: int, index):
    return pl.BlockSpec((None,) * rank, index)


def _forward(q, k, v, qpos, kvlen, qseg, kseg, st: _Static):
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    bq, bk = st.blocks.block_q, st.blocks.block_k
    nq, nk = tq // bq, tk // bk
    lo, hi = common.kv_block_range(qpos, kvlen, bq, bk, nk, causal=st.causal, window=st.window)
    seg = qseg is not None
    in_specs = [
        _scalar_spec(2, lambda i, bb, h: (bb, i)),
        _scalar_spec(2, lambda i, bb, h: (bb, i)),
        _scalar_spec(1, lambda i, bb, h: (bb,)),
        pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, tk, None, d), lambda i, bb, h: (bb, 0, h // g, 0)),
        pl.BlockSpec((None, tk, None, d), lambda i, bb, h: (bb, 0, h // g, 0)),
        pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)),
        pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)) if seg else None,
        pl.BlockSpec((None, tk), lambda i, bb, h: (bb, 0)) if seg else None,
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)]
    o, lse2 = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, block_k=bk),
        grid=(nq, b, hq), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=pltr.CompilerParams(num_warps=st.blocks.num_warps, num_stages=st.blocks.num_stages),
        interpret=st.interpret, name="flash_fwd_triton",
    )(lo, hi, kvlen, q, k, v, qpos, qseg, kseg)
    return o, lse2


def _backward(q, k, v, qpos, kvlen, qseg, kseg, o, lse2, do, dlse, st: _Static):
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    blk = st.blocks
    seg = qseg is not None
    # delta = rowsum(dO * O) - dLSE: the lse cotangent enters the softmax gradient as a shift.
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    cp = pltr.CompilerParams(num_warps=blk.num_warps_bwd, num_stages=blk.num_stages_bwd)

    bq, bk = blk.block_q_dq, blk.block_k_dq
    nq, nk = tq // bq, tk // bk
    lo, hi = common.kv_block_range(qpos, kvlen, bq, bk, nk, causal=st.causal, window=st.window)
    qspec = pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0))
    kvspec = pl.BlockSpec((None, tk, None, d), lambda i, bb, h: (bb, 0, h // g, 0))
    rowspec = pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_k=bk),
        grid=(nq, b, hq),
        in_specs=[
            _scalar_spec(2, lambda i, bb, h: (bb, i)), _scalar_spec(2, lambda i, bb, h: (bb, i)),
            _scalar_spec(1, lambda i, bb, h: (bb,)), qspec, kvspec, kvspec, qspec, rowspec, rowspec,
            pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)),
            pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)) if seg else None,
            pl.BlockSpec((None, tk), lambda i, bb, h: (bb, 0)) if seg else None,
        ],
        out_specs=qspec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=cp,
        interpret=st.interpret, name="flash_dq_triton",
    )(lo, hi, kvlen, q, k, v, do, lse2, delta, qpos, qseg, kseg)

    bq, bk = blk.block_q_dkv, blk.block_k_dkv
    nq, nk = tq // bq, tk // bk
    lo, hi = common.q_block_range(qpos, kvlen, bq, bk, nk, causal=st.causal, window=st.window)
    qgspec = pl.BlockSpec((None, tq, g, d), lambda i, bb, h: (bb, 0, h, 0))
    kvspec = pl.BlockSpec((None, bk, None, d), lambda i, bb, h: (bb, i, h, 0))
    rowspec = pl.BlockSpec((None, g, tq), lambda i, bb, h: (bb, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, block_q=bq, group=g),
        grid=(nk, b, hkv),
        in_specs=[
            _scalar_spec(2, lambda i, bb, h: (bb, i)), _scalar_spec(2, lambda i, bb, h: (bb, i)),
            _scalar_spec(1, lambda i, bb, h: (bb,)), qgspec, kvspec, kvspec, qgspec, rowspec, rowspec,
            pl.BlockSpec((None, tq), lambda i, bb, h: (bb, 0)),
            pl.BlockSpec((None, tq), lambda i, bb, h: (bb, 0)) if seg else None,
            pl.BlockSpec((None, bk), lambda i, bb, h: (bb, i)) if seg else None,
        ],
        out_specs=[kvspec, kvspec], out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2, compiler_params=cp,
        interpret=st.interpret, name="flash_dkv_triton",
    )(lo, hi, kvlen, q, k, v, do, lse2, delta, qpos, qseg, kseg)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qpos, kvlen, qseg, kseg, st):
    o, lse2 = _forward(q, k, v, qpos, kvlen, qseg, kseg, st)
    return o, lse2 * common.LN2


def _flash_fwd(q, k, v, qpos, kvlen, qseg, kseg, st):
    o, lse2 = _forward(q, k, v, qpos, kvlen, qseg, kseg, st)
    return (o, lse2 * common.LN2), (q, k, v, qpos, kvlen, qseg, kseg, o, lse2)


def _flash_bwd(st, res, cts):
    q, k, v, qpos, kvlen, qseg, kseg, o, lse2 = res
    do, dlse = cts
    dq, dk, dv = _backward(q, k, v, qpos, kvlen, qseg, kseg, o, lse2, do.astype(o.dtype), dlse, st)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_positions, kv_lengths, causal=True, window=None, segment_ids=None, softcap=None,
                    scale=None, mask=None, return_lse=False, block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
    """`reference.attention` computed by the Triton-lowered flash kernels (differentiable in q, k, v)."""
    common.check(q, k, v, window=window, softcap=softcap, mask=mask)
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    blocks = (block_sizes or BlockSizes.for_head_dim(d)).fit(tq, tk)
    st = _Static(causal=bool(causal), window=None if window is None else int(window),
                 softcap=None if softcap is None else float(softcap),
                 scale=float(d**-0.5 if scale is None else scale), blocks=blocks, interpret=interpret)
    qseg, kseg = common.split_segments(segment_ids, tq, tk)
    # Pad to whole blocks: padded queries repeat the last real slot (no wider key range) and their
    # zero cotangent keeps them out of dk/dv; padded keys sit at slots >= kv_length, always masked.
    tq_p = -(-tq // max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)) * max(
        blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)
    tk_p = -(-tk // max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)) * max(
        blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)
    qp = common.pad_axis(q, 1, tq_p)
    kp, vp = common.pad_axis(k, 1, tk_p), common.pad_axis(v, 1, tk_p)
    qpos = common.pad_axis(common.positions(q_positions, b, tq), 1, tq_p, "edge")
    kvlen = common.lengths(kv_lengths, b, tk)
    if qseg is not None:
        qseg = common.pad_axis(qseg, 1, tq_p, "edge")
        kseg = common.pad_axis(kseg, 1, tk_p)
    o, lse = _flash(qp, kp, vp, qpos, kvlen, qseg, kseg, st)
    o, lse = o[:, :tq], lse[:, :, :tq]
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- decode
@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Flash-decoding tiles: `block_k` keys per step, `num_splits` programs along the KV length
    per (batch, KV head) (0: from `target_programs`).

    `target_programs=0` sizes the grid to one wave of the CTAs that fit on the chip at once
    (SMs x CTAs per SM, the latter from the shared memory of the pipelined K/V tiles). On an
    H200 (2026-12-05) the old fixed 528 programs of bk128 at 3 stages (128 KB of tiles, one CTA
    per SM, ~3.9 waves of 8-tile programs at 8k keys) read 3.12 TB/s at 8k keys and bk64 at
    3 stages (three CTAs per SM) 3.24 TB/s: with short programs, each one's pipeline ramp and the
    last partial wave are a large share of the time."""

    block_k: int = 64
    num_splits: int = 0
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 0

    def programs(self, head_dim: int, itemsize: int) -> int:
        """The grid size to aim for (see the class docstring)."""
        if self.target_programs:
            return self.target_programs
        # Triton's pipeliner keeps num_stages - 1 K and V tiles in shared memory (bk256 x D128 bf16
        # at 3 stages, 256 KB by this count, failed with a runtime error on an H200; bk128 at 4 stages, 192 KB, ran)
        tile = 2 * self.block_k * head_dim * itemsize * max(1, self.num_stages - 1)
        per_sm = max(1, min(8, SMEM_PER_SM // (tile + 4096)))
        return _sm_count() * per_sm


SMEM_PER_SM = 228 * 1024  # Hopper (H100/H200); on an A100 (164 KB) this overestimates CTAs per SM


def _sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", None) or 132


def _decode_kernel(kvlen_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
                   *, st: _Static, block_k: int, blocks_per_split: int, n_blocks: int):
    q = q_ref[...]  # [M, D]: the group's query heads x query tokens, padded
    m_rows, d = q.shape
    precise = q.dtype == jnp.float32
    kv_len = kvlen_ref[()]
    rows_pos = qpos_ref[...]
    qpos = rows_pos[:, None]
    qseg = None if qseg_ref is None else qseg_ref[...][:, None]
    # the key blocks any row may see (common.kv_block_range), computed here rather than in XLA ops
    # before the kernel: at 8k keys the whole call takes ~80 us and every extra op costs a launch
    hi_e = kv_len
    if st.causal:
        hi_e = jnp.minimum(hi_e, jnp.max(rows_pos) + 1)
    lo_e = jnp.int32(0)
    if st.window is not None:
        lo_e = jnp.maximum(lo_e, jnp.min(rows_pos) - st.window + 1)
    none = hi_e <= lo_e
    first = pl.program_id(2) * blocks_per_split
    lo = jnp.maximum(jnp.where(none, 0, jnp.clip(lo_e // block_k, 0, n_blocks)), first)
    hi = jnp.minimum(jnp.where(none, 0, jnp.clip((hi_e + block_k - 1) // block_k, 0, n_blocks)),
                     first + blocks_per_split)

    def body(j, carry):
        acc, m, l = carry
        ks = pl.ds(j * block_k, block_k)
        s, _ = _logits(q, k_ref[ks, :], st.scale, st.softcap, precise)
        kpos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :]
        ok = allowed(qpos, kpos, kv_len, causal=st.causal, window=st.window, qseg=qseg,
                     kseg=None if kseg_ref is None else kseg_ref[ks][None, :])
        s = jnp.where(ok, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(ok, jnp.exp2(s - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precise=precise)
        return acc, m_new, l

    init = (jnp.zeros((m_rows, d), jnp.float32), jnp.full((m_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((m_rows,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    empty = l == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * common.LN2)


def decode_partials(qr, k, v, rpos, kvlen, rseg, kseg, *, st: _Static, blocks: DecodeBlockSizes, block_k: int):
    """Per-split partial results. qr [B, Hkv, M, D] (rows: group heads x tokens), rpos/rseg [B, M].
    Returns o [S, B, Hkv, M, D] fp32, lse [S, B, Hkv, M] natural log."""
    b, hkv, m_rows, d = qr.shape
    tk = k.shape[1]
    nkb = tk // block_k
    # one split per (b, head) at least; beyond that, as many as keep the grid within the target
    splits = blocks.num_splits or max(1, min(nkb, blocks.programs(d, k.dtype.itemsize) // (b * hkv)))
    per = cdiv(nkb, splits)
    splits = cdiv(nkb, per)
    seg = rseg is not None
    return pl.pallas_call(
        functools.partial(_decode_kernel, st=st, block_k=block_k, blocks_per_split=per, n_blocks=nkb),
        grid=(b, hkv, splits),
        in_specs=[
            _scalar_spec(1, lambda bb, h, s: (bb,)),
            pl.BlockSpec((None, None, m_rows, d), lambda bb, h, s: (bb, h, 0, 0)),
            pl.BlockSpec((None, tk, None, d), lambda bb, h, s: (bb, 0, h, 0)),
            pl.BlockSpec((None, tk, None, d), lambda bb, h, s: (bb, 0, h, 0)),
            pl.BlockSpec((None, m_rows), lambda bb, h, s: (bb, 0)),
            pl.BlockSpec((None, m_rows), lambda bb, h, s: (bb, 0)) if seg else None,
            pl.BlockSpec((None, tk), lambda bb, h, s: (bb, 0)) if seg else None,
        ],
        out_specs=[pl.BlockSpec((None, None, None, m_rows, d), lambda bb, h, s: (s, bb, h, 0, 0)),
                   pl.BlockSpec((None, None, None, m_rows), lambda bb, h, s: (s, bb, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((splits, b, hkv, m_rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, hkv, m_rows), jnp.float32)],
        compiler_params=pltr.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=st.interpret, name="flash_decode_triton",
    )(kvlen, qr, k, v, rpos, rseg, kseg)
