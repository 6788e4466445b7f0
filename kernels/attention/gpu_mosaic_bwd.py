"""Flash attention backward for Hopper, Pallas Mosaic GPU: dK, dV and dQ in one pass (FlashAttention-3 style).

One CTA owns 2 x block_k key rows of one (batch, KV head): two compute warpgroups of block_k keys each
keep their K, V tile and their dK, dV accumulators on chip while one memory warpgroup streams every
(query head of the GQA group, query block) they need through a ring of `max_concurrent_steps` SMEM
slots (Q, dO, base-2 lse and delta, each with its own TMA barrier, released by one "consumed" barrier).
Per step each warpgroup computes, for its keys,

    S^T = K Q^T,  P^T = exp2(S^T log2e - lse),  dV += P^T dO,  dP^T = V dO^T,
    dS^T = P^T (dP^T - delta),  dK += dS^T Q

and writes dS^T to SMEM; after a barrier between the two warpgroups each computes half of the head
dimension of dQ_part = dS K over the CTA's 2 x block_k keys and adds it to an fp32 dQ in HBM with a TMA
reduce-add (no second pass over K and V for dQ, 5 matmuls per step instead of 7). dS^T is double-buffered
by step parity, so one barrier per step keeps a warpgroup from overwriting what the other still reads.

Keys need no skipping logic of their own: both warpgroups run every query block the CTA needs (the union
of their causal / window ranges) and mask where theirs does not see it (P = 0). Query rows past the real
length carry dO = 0 and delta = 0, so they add nothing.

delta = rowsum(dO * O) - dlse (the lse cotangent is a shift of the softmax gradient) is one XLA pass; the
scale (and the softcap's 1 - tanh^2 inside dS) is applied to dK in registers and to dQ after the kernel.

Head dim 64 and 128 (at 256 the dK/dV accumulators and the SMEM ring do not fit: gpu_mosaic keeps the
Triton backward there). Tested in the GPU interpret mode on CPU (mgpu_common says what that checks);
not yet compiled or timed on a GPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.attention.common import LOG2E, MASK_VALUE
from kernels.attention.mgpu_common import interpret_params, iota, layout, load_vec, mma

HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class BackwardBlocks:
    block_k: int = 64  # key rows per compute warpgroup; a CTA holds 2 x block_k
    block_q: int = 64  # query rows per streamed step
    max_concurrent_steps: int = 2

    def __post_init__(self):
        if self.block_k != 64:
            raise ValueError(f"block_k must be 64 (one wgmma M tile per warpgroup), got {self.block_k}")
        if self.block_q % 64:
            raise ValueError(f"block_q ({self.block_q}) must be a multiple of 64")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")


def q_ranges(k0, bk: int, bq: int, nq: int, *, tk: int, causal: bool, window: int | None):
    """Query-block steps for keys [k0, k0 + bk): [lo, hi) needed, [flo, fhi) needing no mask."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    lo, hi = i32(0), i32(nq)
    if causal:  # query r sees key c only if c <= r
        lo = lax.div(k0, i32(bq))
    if window is not None:  # and only if r - c < window
        hi = jnp.minimum(hi, lax.div(k0 + bk + window - 2, i32(bq)) + 1)
    hi = jnp.where(k0 >= tk, lo, jnp.maximum(hi, lo))
    flo, fhi = lo, hi
    if causal:
        flo = jnp.maximum(flo, lax.div(k0 + bk - 1 + bq - 1, i32(bq)))
    if window is not None:
        fhi = jnp.minimum(fhi, lax.div(k0 + window, i32(bq)))
    fhi = jnp.where(k0 + bk <= tk, fhi, flo)  # a block with padding keys always masks
    flo = jnp.minimum(flo, hi)
    fhi = jnp.minimum(jnp.maximum(fhi, flo), hi)
    return lo, flo, fhi, hi


def backward(q, k, v, o, lse2, do, dlse, *, causal: bool, window: int | None, softcap: float | None, scale: float,
             tk: int, blocks: BackwardBlocks, interpret: bool = False):
    """dq, dk, dv of `gpu_mosaic`'s forward. q/o/do [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] with Tq a multiple of
    block_q and Tk of 2 x block_k (padded by the caller), lse2 [B, Hq, Tq] base 2, dlse [B, Hq, Tq]."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, tq, hq, d = q.shape
    tk_p, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    dtype = q.dtype
    bk, bq, slots = blocks.block_k, blocks.block_q, blocks.max_concurrent_steps
    nq, n_tiles = tq // bq, tk_p // (2 * bk)
    interp = interpret
    qk_scale = scale * (1.0 if softcap is not None else LOG2E)
    dq_split = 2 if d >= 128 else 1  # warpgroups sharing dQ_part's columns (128 B swizzle tiles of bf16)
    dh = d // dq_split
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, scoped):
        ((k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem),
         (kv_bar, q_bar, do_bar, lse_bar, delta_bar), used, ds_bar, rmw_bar) = scoped
        batch, kv_head, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k_seq")
        wg = lax.axis_index("wg")
        k_base = tile * (2 * bk)
        rng = functools.partial(q_ranges, bq=bq, nq=nq, tk=tk, causal=causal, window=window)
        cta_lo, _, _, cta_hi = rng(k_base, 2 * bk)
        n = cta_hi - cta_lo

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k0 = k_base + wg * bk
            rows = pl.ds(wg * bk, bk)
            k_wg, v_wg = k_smem.at[rows], v_smem.at[rows]
            kv_src = (batch, pl.ds(k0, bk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[kv_src], k_wg, kv_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[kv_src], v_wg, kv_bar.at[wg])
            plgpu.barrier_wait(kv_bar.at[wg])
            _, flo, fhi, _ = rng(k0, bk)
            flo = jnp.clip(flo, cta_lo, cta_hi)
            fhi = jnp.clip(fhi, flo, cta_hi)
            zeros = layout(interp, jnp.full((bk, d), 0.0, jnp.float32))

            def step(qb, carry, h, masked: bool):
                dk, dv = carry
                t = h * n + qb - cta_lo
                slot, par = lax.rem(t, jnp.int32(slots)), lax.rem(t, jnp.int32(2))
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(lse_bar.at[slot])
                st = mma(interp, (bk, bq), k_wg, q_smem.at[slot], b_t=True)  # S^T [keys, queries]
                if softcap is not None:
                    tanh = jnp.tanh(st * (scale / softcap))
                    s2 = tanh * (softcap * LOG2E)
                else:
                    s2 = st * qk_scale
                if masked:
                    kr = iota(interp, (bk, bq), 0) + k0
                    qc = iota(interp, (bk, bq), 1) + qb * bq
                    ok = kr < tk
                    if causal:
                        ok = ok & (kr <= qc)
                    if window is not None:
                        ok = ok & (qc - kr < window)
                    s2 = jnp.where(ok, s2, MASK_VALUE)
                lse = load_vec(interp, lse_smem.at[slot], "COL")
                pt = jnp.exp2(s2 - lax.broadcast_in_dim(lse, (bk, bq), [1]))
                plgpu.barrier_wait(do_bar.at[slot])
                plgpu.barrier_wait(delta_bar.at[slot])
                dv = mma(interp, (bk, d), pt.astype(dtype), do_smem.at[slot], acc=dv, a_ref=False)
                dpt = mma(interp, (bk, bq), v_wg, do_smem.at[slot], b_t=True)
                dlt = load_vec(interp, delta_smem.at[slot], "COL")
                dst = pt * (dpt - lax.broadcast_in_dim(dlt, (bk, bq), [1]))
                if softcap is not None:
                    dst = dst * (1.0 - tanh * tanh)
                ds16 = dst.astype(dtype)
                dk = mma(interp, (bk, d), ds16, q_smem.at[slot], acc=dk, a_ref=False)
                plgpu.barrier_arrive(used.at[slot])  # Q, dO, lse, delta of this slot are read

                # dQ_part = dS K over the CTA's keys: both halves of dS^T must be in SMEM first.
                ds_smem.at[par, rows][...] = ds16
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_bar)
                plgpu.barrier_wait(ds_bar)

                @pl.when(wg < dq_split)
                def _dq():
                    cols = pl.ds(wg * dh, dh)
                    part = mma(interp, (bq, dh), ds_smem.at[par], k_smem.at[:, cols], a_t=True)
                    dst_ref = dq_ref.at[batch, pl.ds(qb * bq, bq), kv_head * g + h, cols]
                    buf = dq_smem.at[wg]
                    if interp:  # no TMA reduction in the interpreter; grid points run one at a time there
                        plgpu.copy_gmem_to_smem(dst_ref, buf, rmw_bar.at[wg])
                        plgpu.barrier_wait(rmw_bar.at[wg])
                        buf[...] = buf[...] + part
                        plgpu.copy_smem_to_gmem(buf, dst_ref)
                        plgpu.wait_smem_to_gmem(0)
                    else:
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's add has read buf
                        buf[...] = part
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(buf, dst_ref, reduction_op="add")

                return dk, dv

            def head(h, carry):
                carry = lax.fori_loop(cta_lo, flo, functools.partial(step, h=h, masked=True), carry)
                carry = lax.fori_loop(flo, fhi, functools.partial(step, h=h, masked=False), carry)
                return lax.fori_loop(fhi, cta_hi, functools.partial(step, h=h, masked=True), carry)

            dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
            # The other warpgroup's last dQ_part reads these K rows: wait for it before staging dK here.
            plgpu.barrier_arrive(ds_bar)
            plgpu.barrier_wait(ds_bar)
            k_wg[...] = (dk * scale).astype(dtype)
            v_wg[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_wg, dk_ref.at[kv_src])
            plgpu.copy_smem_to_gmem(v_wg, dv_ref.at[kv_src])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(t, slot):
                h, qb = lax.div(t, n), cta_lo + lax.rem(t, n)
                hq_i = kv_head * g + h
                rows = (batch, pl.ds(qb * bq, bq), hq_i)
                vec = (batch, hq_i, pl.ds(qb * bq, bq))
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[slot], lse_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot], delta_bar.at[slot])

            total = g * n
            for i in range(slots):
                pl.when(i < total)(functools.partial(issue, jnp.int32(i), i))

            @pl.loop(jnp.int32(slots), jnp.maximum(total, slots))
            def _(t):
                slot = lax.rem(t, jnp.int32(slots))
                plgpu.barrier_wait(used.at[slot])
                issue(t, slot)

            # Observe the last releases too: every barrier phase is awaited (the interpreter checks this).
            @pl.loop(jnp.maximum(total - slots, 0), total)
            def _(t):
                plgpu.barrier_wait(used.at[lax.rem(t, jnp.int32(slots))])

    def entry(*refs):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        tiled = dict(transforms=(tiling, swizzle))
        smem = (
            plgpu.SMEM((2 * bk, d), dtype, **tiled),
            plgpu.SMEM((2 * bk, d), dtype, **tiled),
            plgpu.SMEM((slots, bq, d), dtype, **tiled),
            plgpu.SMEM((slots, bq, d), dtype, **tiled),
            plgpu.SMEM((slots, bq), jnp.float32),
            plgpu.SMEM((slots, bq), jnp.float32),
            plgpu.SMEM((2, 2 * bk, bq), dtype, **tiled),
            # fp32 tiles: 32 elements make the 128-byte swizzle row (conflict-free stores of the accumulator).
            plgpu.SMEM((dq_split, bq, dh), jnp.float32, transforms=(plgpu.TilingTransform((8, 32)), swizzle)),
        )
        loads = (plgpu.Barrier(num_arrivals=2, num_barriers=2),) + (plgpu.Barrier(num_barriers=slots),) * 4
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            smem, loads,
            plgpu.Barrier(num_arrivals=2, num_barriers=slots),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_barriers=2),
            collective_axes="wg",
        )

    mesh = dict(grid=(hkv, n_tiles, b), grid_names=("heads", "k_seq", "batch"), num_threads=3, thread_name="wg")
    params = plgpu.CompilerParams(approx_math=True)
    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    dq_type = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    if interp:
        # The interpreter zero-fills outputs (uninitialized_memory="zero") and runs grid points one after
        # another, so dQ can be an ordinary output updated read-modify-write.
        dq, dk, dv = plgpu.kernel(entry, out_type=[dq_type, kv_type, kv_type], compiler_params=params,
                                  interpret=interpret_params(uninitialized_memory="zero"), **mesh)(
            q, k, v, do, lse2, delta)
    else:
        # dQ is reduce-added into by every CTA: a zeroed buffer aliased in and out of the kernel.
        dq_acc = jax.new_ref(jnp.zeros(dq_type.shape, jnp.float32))
        dk, dv = pl.kernel(entry, out_type=[kv_type, kv_type], mesh=plgpu.Mesh(**mesh),
                           compiler_params=params, name="flash_bwd_mgpu")(q, k, v, do, lse2, delta, dq_acc)
        dq = dq_acc[...]
    return (dq * scale).astype(dtype), dk, dv
