"""Flash attention forward for Hopper, Pallas Mosaic GPU (wgmma, TMA, warp specialisation).

One CTA owns 2 x block_q query rows of one (batch, query head): two compute warpgroups of
block_q rows each and one memory warpgroup that streams K/V blocks through a ring of
`max_concurrent_steps` SMEM slots with TMA, released by "consumed" barriers. A schedule
barrier makes the two compute warpgroups alternate so that one's softmax overlaps the other's
wgmma (FlashAttention-3's ping-pong).

The kernel serves the training / prefill layout: query i at slot i (`q_positions=None`), all
Tk keys valid (`kv_lengths=None`), causal or not, sliding window, softcap, GQA, bf16/fp16,
head_dim 64/128/256. Everything is iota-based and static, so key blocks are classified per
warpgroup into skipped / masked / unmasked ranges on the fly. Calls outside that envelope
(ragged kv_lengths, segment ids, cache slots) raise `Unsupported`; `api` serves them elsewhere.
The backward is gpu_mosaic_bwd's (dK, dV and dQ in one pass) at head_dim 64/128 and the Triton dq
and dk/dv kernels at 256 (same residual layout: base-2 lse).

Status: compiles on an H100 (jax 0.11.2) and passed 3 of its 9 pairwise GPU tests before the
session's time limit (none failed; 2026-11-23). On an H200 (2026-12-04) the forward ran at 0.89-1.02x
the better of cuDNN and tokamax, forward+backward at 0.39-0.43x with the Triton backward, so `api`
uses it only when asked for by name (`impl="pallas_mgpu"`); docs/attention.md. The Mosaic GPU backward
(2026-12-04, later) passes its tests in the GPU interpret mode on CPU and lowers for CUDA; it has not
run on a GPU yet. On CPU, `interpret=True` runs both in that mode (mgpu_common).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.attention import common, gpu_mosaic_bwd, gpu_triton
from kernels.attention.mgpu_common import interpret_params, iota, layout, mma
from kernels.attention.common import LOG2E, MASK_VALUE, cdiv


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 64  # rows per compute warpgroup; a CTA holds 2 x block_q
    block_kv: int = 128
    max_concurrent_steps: int = 2
    # None: the Mosaic GPU backward (gpu_mosaic_bwd) at head dim 64/128, the Triton one at 256.
    backward: gpu_mosaic_bwd.BackwardBlocks | gpu_triton.BlockSizes | None = None

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64:
            raise ValueError(f"block_q ({self.block_q}) and block_kv ({self.block_kv}) must be multiples of 64")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "BlockSizes":
        if head_dim <= 128:
            return cls(block_q=64, block_kv=128, max_concurrent_steps=2)
        return cls(block_q=64, block_kv=64, max_concurrent_steps=2)


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    tk: int  # real key count (keys at slots >= tk are padding)
    blocks: BlockSizes
    interpret: bool = False


def supports(q, k, v, *, q_positions, kv_lengths, segment_ids=None, mask=None, window=None, softcap=None,
             **_) -> str | None:
    """None if the kernel serves these arguments, else the reason (naming the argument)."""
    try:
        common.check(q, k, v, window=window, softcap=softcap, mask=mask, head_dims=(64, 128, 256))
    except common.Unsupported as e:
        return str(e)
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {q.dtype}: the Mosaic GPU kernel takes bfloat16/float16"
    if q_positions is not None:
        return "q_positions: the Mosaic GPU kernel serves the default layout (q_positions=None) only"
    if kv_lengths is not None:
        return "kv_lengths: the Mosaic GPU kernel serves all-valid keys (kv_lengths=None) only"
    if segment_ids is not None:
        return "segment_ids are not supported by the Mosaic GPU kernel"
    return None


def _ranges(q0, bq: int, bkv: int, st: _Static):
    """Key-step ranges for rows [q0, q0 + bq): [lo, hi) needed, [flo, fhi) needing no mask."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    n_valid, n_full = cdiv(st.tk, bkv), st.tk // bkv
    hi = i32(n_valid)
    fhi = i32(n_full)
    if st.causal:
        hi = jnp.minimum(hi, lax.div(q0 + bq + bkv - 1, i32(bkv)))
        fhi = jnp.minimum(fhi, lax.div(q0 + 1, i32(bkv)))
    lo = i32(0)
    flo = i32(0)
    if st.window is not None:
        lo = lax.div(jnp.maximum(q0 - st.window + 1, 0), i32(bkv))
        flo = lax.div(jnp.maximum(q0 + bq - st.window, 0) + bkv - 1, i32(bkv))
    hi = jnp.maximum(hi, lo)
    flo = jnp.minimum(jnp.maximum(flo, lo), hi)
    fhi = jnp.minimum(jnp.maximum(fhi, flo), hi)
    return lo, flo, fhi, hi


def _forward(q, k, v, st: _Static):
    """q [B, Tq, Hq, D] with Tq a multiple of 2*block_q; k/v [B, Tk, Hkv, D], Tk a multiple of block_kv.
    Returns o [B, Tq, Hq, D] and the base-2 lse [B, Hq, Tq]."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    dtype = q.dtype
    bq, bkv = st.blocks.block_q, st.blocks.block_kv
    slots = st.blocks.max_concurrent_steps
    n_tiles = tq // (2 * bq)
    qk_scale = st.scale * (1.0 if st.softcap is not None else LOG2E)
    interp = st.interpret

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (qo_smem2, k_smem, v_smem, lse_smem2), (k_bar, v_bar, q_bar), (k_used, v_used), sched = scoped
        batch, head, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
        if st.causal:  # longest first: CTAs launch in grid order, and the last q tiles do the most key steps
            tile = n_tiles - 1 - tile
        wg = lax.axis_index("wg")
        q_base = tile * (2 * bq)
        cta_lo, _, _, _ = _ranges(q_base, bq, bkv, st)
        _, _, _, cta_hi = _ranges(q_base + bq, bq, bkv, st)

        def schedule():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        def slot_of(step):
            return lax.rem(step - cta_lo, jnp.int32(slots))

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            q0 = q_base + wg * bq
            lo, flo, fhi, hi = _ranges(q0, bq, bkv, st)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q0, bq), head], qo_smem, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            m_i = layout(interp, jnp.full((bq,), -jnp.inf, jnp.float32), "ROW")
            l_i = layout(interp, jnp.full((bq,), 0.0, jnp.float32), "ROW")
            acc = layout(interp, jnp.full((bq, d), 0.0, jnp.float32))
            pl.when(wg == 1)(schedule)

            def skip(step, carry):
                # Steps the other warpgroup needs: keep barrier phases and the schedule in step.
                slot = slot_of(step)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_used.at[slot])
                schedule()
                plgpu.barrier_wait(v_bar.at[slot])
                schedule()
                plgpu.barrier_arrive(v_used.at[slot])
                return carry

            def step_fn(step, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = slot_of(step)
                plgpu.barrier_wait(k_bar.at[slot])
                s = mma(interp, (bq, bkv), qo_smem, k_smem.at[slot], b_t=True, between=schedule)
                plgpu.barrier_arrive(k_used.at[slot])
                s = s * qk_scale
                if st.softcap is not None:
                    s = jnp.tanh(s * (1.0 / st.softcap)) * (st.softcap * LOG2E)
                if masked:
                    rows = iota(interp, (bq, bkv), 0) + q0
                    cols = iota(interp, (bq, bkv), 1) + step * bkv
                    ok = cols < st.tk
                    if st.causal:
                        ok = ok & (cols <= rows)
                    if st.window is not None:
                        ok = ok & (rows - cols < st.window)
                    s = jnp.where(ok, s, MASK_VALUE)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)
                acc = mma(interp, (bq, d), p16, v_smem.at[slot], acc=acc, a_ref=False)
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            masked = functools.partial(step_fn, masked=True)
            full = functools.partial(step_fn, masked=False)
            lax.fori_loop(cta_lo, lo, skip, None)
            carry = lax.fori_loop(lo, flo, masked, (acc, m_i, l_i))
            carry = lax.fori_loop(flo, fhi, full, carry)
            acc, m_i, l_i = lax.fori_loop(fhi, hi, masked, carry)
            lax.fori_loop(hi, cta_hi, skip, None)
            pl.when(wg == 0)(schedule)

            # Rows with no key at all (only padding rows can have none) keep l = 0: write 0, not NaN.
            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
            acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            lse_smem[...] = m_i + jnp.log(l_safe) * (1.0 / math.log(2.0))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, pl.ds(q0, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(g))
            n = cta_hi - cta_lo

            def issue(step, slot):
                sl = (batch, pl.ds(step * bkv, bkv), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

            for i in range(slots):
                pl.when(i < n)(functools.partial(issue, cta_lo + i, i))

            @pl.loop(cta_lo + slots, jnp.maximum(cta_hi, cta_lo + slots))
            def _(step):
                slot = slot_of(step)
                plgpu.barrier_wait(k_used.at[slot])
                plgpu.barrier_wait(v_used.at[slot])
                issue(step, slot)

            # Observe the last releases too: every barrier phase is awaited (the interpreter checks this).
            @pl.loop(jnp.maximum(cta_hi - slots, cta_lo), cta_hi)
            def _(step):
                plgpu.barrier_wait(k_used.at[slot_of(step)])
                plgpu.barrier_wait(v_used.at[slot_of(step)])

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        smem = (
            plgpu.SMEM((2, bq, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((slots, bkv, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((slots, bkv, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((2, bq), jnp.float32),
        )
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scoped),
            smem,
            (plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=slots),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    out_type = [jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)]
    return plgpu.kernel(
        entry, out_type=out_type, grid=(hq, n_tiles, b), grid_names=("heads", "q_seq", "batch"),
        num_threads=3, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": interpret_params()} if interp else {}),
    )(q, k, v)


def _backward_blocks(blocks: BlockSizes, d: int):
    if blocks.backward is not None:
        return blocks.backward
    if d in gpu_mosaic_bwd.HEAD_DIMS:
        return gpu_mosaic_bwd.BackwardBlocks()
    return gpu_triton.BlockSizes.for_head_dim(d)


def _pad_multiple(blocks: BlockSizes, d: int) -> int:
    """Sequence lengths are padded to a multiple of every block the forward and backward use."""
    bwd = _backward_blocks(blocks, d)
    if isinstance(bwd, gpu_mosaic_bwd.BackwardBlocks):
        sizes = (2 * bwd.block_k, bwd.block_q)
    else:
        sizes = (bwd.block_q, bwd.block_k, bwd.block_q_dq, bwd.block_k_dq, bwd.block_q_dkv, bwd.block_k_dkv)
    return max(2 * blocks.block_q, blocks.block_kv, *sizes)


def _triton_static(st: _Static, d: int, tq: int, tk: int) -> gpu_triton._Static:
    blocks = _backward_blocks(st.blocks, d).fit(tq, tk)
    return gpu_triton._Static(causal=st.causal, window=st.window, softcap=st.softcap, scale=st.scale, blocks=blocks,
                              interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, st):
    o, lse2 = _forward(q, k, v, st)
    return o, lse2 * common.LN2


def _flash_fwd(q, k, v, st):
    o, lse2 = _forward(q, k, v, st)
    return (o, lse2 * common.LN2), (q, k, v, o, lse2)


def _flash_bwd(st, res, cts):
    q, k, v, o, lse2 = res
    do, dlse = cts
    b, tq, _, d = q.shape
    bwd = _backward_blocks(st.blocks, d)
    if isinstance(bwd, gpu_mosaic_bwd.BackwardBlocks):
        return gpu_mosaic_bwd.backward(q, k, v, o, lse2, do.astype(o.dtype), dlse, causal=st.causal, window=st.window,
                                       softcap=st.softcap, scale=st.scale, tk=st.tk, blocks=bwd,
                                       interpret=st.interpret)
    tst = _triton_static(st, q.shape[3], tq, k.shape[1])
    # The same slots as the forward (iota, padding rows included), so every row's mask matches its lse.
    qpos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32)[None], (b, tq))
    kvlen = jnp.full((b,), st.tk, jnp.int32)
    dq, dk, dv = gpu_triton._backward(q, k, v, qpos, kvlen, None, None, o, lse2, do.astype(o.dtype), dlse, tst)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_positions=None, kv_lengths=None, causal=True, window=None, segment_ids=None,
                    softcap=None, scale=None, mask=None, return_lse=False, block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
    """`reference.attention` (default layout) by the Mosaic GPU forward and backward (Triton backward at
    head_dim 256 or when `block_sizes.backward` is a `gpu_triton.BlockSizes`)."""
    why = supports(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths, segment_ids=segment_ids, mask=mask,
                   window=window, softcap=softcap)
    if why:
        raise common.Unsupported(why)
    if interpret and interpret_params() is None:
        raise common.Unsupported(f"this JAX ({jax.__version__}) has no Pallas Mosaic GPU interpret mode; "
                                 "run the kernel on a Hopper GPU")
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    blocks = block_sizes or BlockSizes.for_head_dim(d)
    st = _Static(causal=bool(causal), window=None if window is None else int(window),
                 softcap=None if softcap is None else float(softcap),
                 scale=float(d**-0.5 if scale is None else scale), tk=tk, blocks=blocks, interpret=bool(interpret))
    if isinstance(blocks.backward, gpu_mosaic_bwd.BackwardBlocks) and d not in gpu_mosaic_bwd.HEAD_DIMS:
        raise common.Unsupported(f"head_dim {d}: the Mosaic GPU backward takes head_dim {gpu_mosaic_bwd.HEAD_DIMS}")
    mult = _pad_multiple(blocks, d)
    tq_p, tk_p = cdiv(tq, mult) * mult, cdiv(tk, mult) * mult
    o, lse = _flash(common.pad_axis(q, 1, tq_p), common.pad_axis(k, 1, tk_p), common.pad_axis(v, 1, tk_p), st)
    o, lse = o[:, :tq], lse[:, :, :tq]
    return (o, lse) if return_lse else o
