"""Flash attention (forward + backward) and flash-decoding for TPUs, Pallas Mosaic TPU.

Mosaic TPU tiles the last two dimensions of every block, so the flash kernels work in
[B, H, T, D] (the wrapper transposes q/k/v/o) and keep per-row vectors (slots, lse, delta) as
[..., T, 1] columns. The key loop is the innermost grid axis ("arbitrary") with the running
max / sum / accumulator in VMEM scratch; blocks outside the range that `common.kv_block_range`
computed (prefetched into SMEM) are skipped, and their index map repeats the last useful block
so that no DMA is issued for them.

Decode keeps the cache in its own [B, S, Hkv, D] layout (transposing a cache every step would
cost more than the attention): it views it as [B, S, Hkv*D] and each program reads a
[block_k, Hkv*D] slab, serving every KV head of one sequence from one contiguous DMA.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import common
from kernels.attention.common import MASK_VALUE, allowed, cdiv, dot


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 128
    block_k: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 128
    block_q_dkv: int = 128
    block_k_dkv: int = 128

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "BlockSizes":
        if head_dim <= 128:
            return cls(block_q=256, block_k=512, block_q_dq=256, block_k_dq=256, block_q_dkv=256, block_k_dkv=256)
        return cls(block_q=128, block_k=256)

    def fit(self, tq: int, tk: int) -> "BlockSizes":
        """Short sequences: one block of the (8-row aligned) sequence instead of a padded big one."""
        fq = lambda b: min(b, max(8, -(-tq // 8) * 8))  # noqa: E731
        fk = lambda b: min(b, max(128, -(-tk // 128) * 128))  # noqa: E731
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
    seg: bool


def _interpret(flag: bool):
    return pltpu.InterpretParams() if flag else False


def _logits(q, k, st: _Static, precise):
    s = dot(q, k, trans_b=True, precise=precise) * st.scale
    t = None
    if st.softcap is not None:
        t = jnp.tanh(s / st.softcap)
        s = st.softcap * t
    return s, t


def _kpos(j, bk):
    return j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(lo_ref, hi_ref, kvlen_ref, *refs, st: _Static, nq: int, nk: int):
    if st.seg:
        q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, qpos_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        qseg_ref = kseg_ref = None
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bk = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b * nq + i]) & (j < hi_ref[b * nq + i]))
    def _step():
        q = q_ref[...]
        precise = q.dtype == jnp.float32
        s, _ = _logits(q, k_ref[...], st, precise)
        ok = allowed(qpos_ref[...], _kpos(j, bk), kvlen_ref[b], causal=st.causal, window=st.window,
                     qseg=None if qseg_ref is None else qseg_ref[...],
                     kseg=None if kseg_ref is None else kseg_ref[...])
        s = jnp.where(ok, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * alpha + dot(p.astype(v.dtype), v, precise=precise)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(safe))


def _clamp(j, lo, hi):
    """The block to fetch at step j: inside [lo, hi) so skipped steps reuse the last DMA."""
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, 0))


def _forward(q, k, v, qpos, kvlen, qseg, kseg, st: _Static):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], qpos/qseg [B, Tq, 1], kseg [B, 1, Tk]."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    bq, bk = st.blocks.block_q, st.blocks.block_k
    nq, nk = tq // bq, tk // bk
    lo, hi = common.kv_block_range(qpos[..., 0], kvlen, bq, bk, nk, causal=st.causal, window=st.window)

    def kv_map(bb, h, i, j, lo, hi, kvl):
        return bb, h // g, _clamp(j, lo[bb * nq + i], hi[bb * nq + i]), 0

    def kseg_map(bb, h, i, j, lo, hi, kvl):
        return bb, 0, _clamp(j, lo[bb * nq + i], hi[bb * nq + i])

    qmap = lambda bb, h, i, j, *_: (bb, h, i, 0)  # noqa: E731
    rowmap = lambda bb, h, i, j, *_: (bb, i, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, bq, d), qmap), pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, bq, 1), rowmap)]
    args = [q, k, v, qpos]
    if st.seg:
        in_specs += [pl.BlockSpec((None, bq, 1), rowmap), pl.BlockSpec((None, 1, bk), kseg_map)]
        args += [qseg, kseg]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(b, hq, nq, nk), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, d), qmap), pl.BlockSpec((None, None, bq, 1), qmap)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(st.interpret), name="flash_fwd_tpu",
    )(lo.reshape(-1), hi.reshape(-1), kvlen, *args)


# ----------------------------------------------------------------------------- backward
def _tile_grads(q, k, v, do, lse, delta, qpos, kpos, kv_len, qseg, kseg, st: _Static):
    precise = q.dtype == jnp.float32
    s, t = _logits(q, k, st, precise)
    ok = allowed(qpos, kpos, kv_len, causal=st.causal, window=st.window, qseg=qseg, kseg=kseg)
    p = jnp.where(ok, jnp.exp(s - lse), 0.0)
    dp = dot(do, v, trans_b=True, precise=precise)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds, precise


def _dq_kernel(lo_ref, hi_ref, kvlen_ref, *refs, st: _Static, nq: int, nk: int):
    if st.seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, kseg_ref, dq_ref, acc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, dq_ref, acc = refs
        qseg_ref = kseg_ref = None
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bk = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b * nq + i]) & (j < hi_ref[b * nq + i]))
    def _step():
        k = k_ref[...]
        _, ds, precise = _tile_grads(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                                     qpos_ref[...], _kpos(j, bk), kvlen_ref[b],
                                     None if qseg_ref is None else qseg_ref[...],
                                     None if kseg_ref is None else kseg_ref[...], st)
        acc[...] += dot(ds.astype(k.dtype), k, precise=precise)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, kvlen_ref, *refs, st: _Static, nq: int, nk: int, steps: int):
    if st.seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, kseg_ref, dk_ref, dv_ref,
         dk_acc, dv_acc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
        qseg_ref = kseg_ref = None
    b, jk, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bk = k_ref.shape[0]
    i = t % nq

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when((i >= lo_ref[b * nk + jk]) & (i < hi_ref[b * nk + jk]))
    def _step():
        q, do = q_ref[...], do_ref[...]
        p, ds, precise = _tile_grads(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], qpos_ref[...],
                                     _kpos(jk, bk), kvlen_ref[b],
                                     None if qseg_ref is None else qseg_ref[...],
                                     None if kseg_ref is None else kseg_ref[...], st)
        dv_acc[...] += dot(p.astype(do.dtype), do, trans_a=True, precise=precise)
        dk_acc[...] += dot(ds.astype(q.dtype), q, trans_a=True, precise=precise)

    @pl.when(t == steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(q, k, v, qpos, kvlen, qseg, kseg, o, lse, do, dlse, st: _Static):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    blk = st.blocks
    delta = (jnp.einsum("bhqd,bhqd->bhq", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse)[..., None]
    sem = ("parallel", "parallel", "parallel", "arbitrary")

    # dq: like the forward, one (b, h, q block) per output tile, walking key blocks.
    bq, bk = blk.block_q_dq, blk.block_k_dq
    nq, nk = tq // bq, tk // bk
    lo, hi = common.kv_block_range(qpos[..., 0], kvlen, bq, bk, nk, causal=st.causal, window=st.window)

    def kv_map(bb, h, i, j, lo, hi, kvl):
        return bb, h // g, _clamp(j, lo[bb * nq + i], hi[bb * nq + i]), 0

    def kseg_map(bb, h, i, j, lo, hi, kvl):
        return bb, 0, _clamp(j, lo[bb * nq + i], hi[bb * nq + i])

    qmap = lambda bb, h, i, j, *_: (bb, h, i, 0)  # noqa: E731
    rowmap = lambda bb, h, i, j, *_: (bb, i, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, bq, d), qmap), pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bq, d), qmap),
                pl.BlockSpec((None, None, bq, 1), qmap), pl.BlockSpec((None, None, bq, 1), qmap),
                pl.BlockSpec((None, bq, 1), rowmap)]
    args = [q, k, v, do, lse, delta, qpos]
    if st.seg:
        in_specs += [pl.BlockSpec((None, bq, 1), rowmap), pl.BlockSpec((None, 1, bk), kseg_map)]
        args += [qseg, kseg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hq, nq, nk), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, d), qmap), scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
        interpret=_interpret(st.interpret), name="flash_dq_tpu",
    )(lo.reshape(-1), hi.reshape(-1), kvlen, *args)

    # dk/dv: one (b, kv head, key block) per output tile; the inner axis walks the group's query
    # heads x query blocks, so GQA accumulates in VMEM instead of a reduction over copies.
    bq, bk = blk.block_q_dkv, blk.block_k_dkv
    nq, nk = tq // bq, tk // bk
    lo, hi = common.q_block_range(qpos[..., 0], kvlen, bq, bk, nk, causal=st.causal, window=st.window)
    steps = g * nq

    def q_map(bb, h, jk, t, lo, hi, kvl):
        return bb, h * g + t // nq, _clamp(t % nq, lo[bb * nk + jk], hi[bb * nk + jk]), 0

    def qrow_map(bb, h, jk, t, lo, hi, kvl):
        return bb, _clamp(t % nq, lo[bb * nk + jk], hi[bb * nk + jk]), 0

    kvmap = lambda bb, h, jk, t, *_: (bb, h, jk, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kvmap),
                pl.BlockSpec((None, None, bk, d), kvmap), pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map), pl.BlockSpec((None, None, bq, 1), q_map),
                pl.BlockSpec((None, bq, 1), qrow_map)]
    args = [q, k, v, do, lse, delta, qpos]
    if st.seg:
        in_specs += [pl.BlockSpec((None, bq, 1), qrow_map),
                     pl.BlockSpec((None, 1, bk), lambda bb, h, jk, t, *_: (bb, 0, jk))]
        args += [qseg, kseg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, nk, steps), in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bk, d), kvmap)] * 2,
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
        interpret=_interpret(st.interpret), name="flash_dkv_tpu",
    )(lo.reshape(-1), hi.reshape(-1), kvlen, *args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qpos, kvlen, qseg, kseg, st):
    return _forward(q, k, v, qpos, kvlen, qseg, kseg, st)


def _flash_fwd(q, k, v, qpos, kvlen, qseg, kseg, st):
    o, lse = _forward(q, k, v, qpos, kvlen, qseg, kseg, st)
    return (o, lse), (q, k, v, qpos, kvlen, qseg, kseg, o, lse)


def _flash_bwd(st, res, cts):
    q, k, v, qpos, kvlen, qseg, kseg, o, lse = res
    do, dlse = cts
    dq, dk, dv = _backward(q, k, v, qpos, kvlen, qseg, kseg, o, lse, do.astype(o.dtype), dlse[..., 0], st)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_positions, kv_lengths, causal=True, window=None, segment_ids=None, softcap=None,
                    scale=None, mask=None, return_lse=False, block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
    """`reference.attention` computed by the Mosaic TPU flash kernels (differentiable in q, k, v)."""
    common.check(q, k, v, window=window, softcap=softcap, mask=mask)
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    blocks = (block_sizes or BlockSizes.for_head_dim(d)).fit(tq, tk)
    qseg, kseg = common.split_segments(segment_ids, tq, tk)
    st = _Static(causal=bool(causal), window=None if window is None else int(window),
                 softcap=None if softcap is None else float(softcap),
                 scale=float(d**-0.5 if scale is None else scale), blocks=blocks, interpret=interpret,
                 seg=qseg is not None)
    mq = max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)
    mk = max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)
    tq_p, tk_p = -(-tq // mq) * mq, -(-tk // mk) * mk
    qt = common.pad_axis(q, 1, tq_p).transpose(0, 2, 1, 3)
    kt = common.pad_axis(k, 1, tk_p).transpose(0, 2, 1, 3)
    vt = common.pad_axis(v, 1, tk_p).transpose(0, 2, 1, 3)
    qpos = common.pad_axis(common.positions(q_positions, b, tq), 1, tq_p, "edge")[..., None]
    kvlen = common.lengths(kv_lengths, b, tk)
    if qseg is not None:
        qseg = common.pad_axis(qseg, 1, tq_p, "edge")[..., None]
        kseg = common.pad_axis(kseg, 1, tk_p)[:, None, :]
    o, lse = _flash(qt, kt, vt, qpos, kvlen, qseg, kseg, st)
    o = o.transpose(0, 2, 1, 3)[:, :tq]
    lse = lse[:, :, :tq, 0]
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- decode
@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    block_k: int = 512
    num_splits: int = 0  # 0: one split per TensorCore pair of programs (2 on v4/v5p megacore)
    default_splits: int = 2


def _decode_kernel(lo_ref, hi_ref, kvlen_ref, *refs, st: _Static, hkv: int, d: int, per: int):
    if st.seg:
        q_ref, k_ref, v_ref, rpos_ref, rseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, rpos_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        rseg_ref = kseg_ref = None
    b, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    jb = s * per + j
    bk = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((jb >= lo_ref[b]) & (jb < hi_ref[b]))
    def _step():
        ok = allowed(rpos_ref[...], _kpos(jb, bk), kvlen_ref[b], causal=st.causal, window=st.window,
                     qseg=None if rseg_ref is None else rseg_ref[...],
                     kseg=None if kseg_ref is None else kseg_ref[...])
        for h in range(hkv):  # static: every KV head of this sequence from the one slab
            q = q_ref[h]
            precise = q.dtype == jnp.float32
            s_, _ = _logits(q, k_ref[:, h * d:(h + 1) * d], st, precise)
            s_ = jnp.where(ok, s_, MASK_VALUE)
            m_prev = m_sc[h]
            m_new = jnp.maximum(m_prev, jnp.max(s_, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.where(ok, jnp.exp(s_ - m_new), 0.0)
            l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=1, keepdims=True)
            v = v_ref[:, h * d:(h + 1) * d]
            acc_sc[h] = acc_sc[h] * alpha + dot(p.astype(v.dtype), v, precise=precise)
            m_sc[h] = m_new

    @pl.when(j == per - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        safe = jnp.where(empty, 1.0, l)
        o_ref[...] = acc_sc[...] / safe
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(safe))


def decode_partials(qr, k, v, rpos, kvlen, rseg, kseg, lo, hi, *, st: _Static, blocks: DecodeBlockSizes,
                    block_k: int):
    """`gpu_triton.decode_partials` plus lo/hi [B], the key-block range (scalar prefetch); k/v stay [B, S, Hkv, D]."""
    b, hkv, m_rows, d = qr.shape
    tk = k.shape[1]
    nkb = tk // block_k
    splits = min(nkb, blocks.num_splits or blocks.default_splits)
    per = cdiv(nkb, splits)
    splits = cdiv(nkb, per)
    kf, vf = k.reshape(b, tk, hkv * d), v.reshape(b, tk, hkv * d)

    def kv_map(bb, s, j, lo, hi, kvl):
        return bb, jnp.minimum(_clamp(s * per + j, lo[bb], hi[bb]), nkb - 1), 0

    def kseg_map(bb, s, j, lo, hi, kvl):
        return bb, 0, jnp.minimum(_clamp(s * per + j, lo[bb], hi[bb]), nkb - 1)

    in_specs = [pl.BlockSpec((None, hkv, m_rows, d), lambda bb, s, j, *_: (bb, 0, 0, 0)),
                pl.BlockSpec((None, block_k, hkv * d), kv_map), pl.BlockSpec((None, block_k, hkv * d), kv_map),
                pl.BlockSpec((None, m_rows, 1), lambda bb, s, j, *_: (bb, 0, 0))]
    args = [qr, kf, vf, rpos[..., None]]
    if st.seg:
        in_specs += [pl.BlockSpec((None, m_rows, 1), lambda bb, s, j, *_: (bb, 0, 0)),
                     pl.BlockSpec((None, 1, block_k), kseg_map)]
        args += [rseg[..., None], kseg[:, None, :]]
    omap = lambda bb, s, j, *_: (s, bb, 0, 0, 0)  # noqa: E731
    o, lse = pl.pallas_call(
        functools.partial(_decode_kernel, st=st, hkv=hkv, d=d, per=per),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, splits, per), in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, hkv, m_rows, d), omap),
                       pl.BlockSpec((None, None, hkv, m_rows, 1), omap)],
            scratch_shapes=[pltpu.VMEM((hkv, m_rows, 1), jnp.float32), pltpu.VMEM((hkv, m_rows, 1), jnp.float32),
                            pltpu.VMEM((hkv, m_rows, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((splits, b, hkv, m_rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, hkv, m_rows, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(st.interpret), name="flash_decode_tpu",
    )(lo, hi, kvlen, *args)
    return o, lse[..., 0]
