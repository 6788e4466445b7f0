"""Selective scan as Pallas GPU (Triton) kernels, forward and backward (custom_vjp).

One program owns `block_p` channels of one (batch, head) and walks the whole sequence; each
thread holds one channel and its N state values in registers, so the state never leaves the
chip. Per step it reads x_t, Δ_t (its channel) and B_t, C_t (N scalars shared by the
program), and writes y_t: HBM sees the inputs and outputs once. The loop body is unrolled
`chunk` steps; the next chunk's x/Δ loads are issued one iteration ahead (`prefetch`).

One program per 32 channels gives too few warps to hide each step's load latency (384 programs
for Mamba-130m's mixer at batch 8), so the forward cuts long sequences into segments run as
separate programs (`segments`): pass 1 computes each segment's end state from a zero start and
its Δ sum, a short lax.scan over segments turns those into every segment's start state, and
pass 2 is the one-pass kernel per segment. It reads x, Δ, B twice and computes the decays twice,
and was still 3.1x faster on an H200 (docs/mamba.md).

Backward: the forward pass for training also writes the state at every chunk boundary
(the only extra HBM traffic, 1/chunk of a [Bt, L, H, P, N] state tensor). The backward
program walks the chunks in reverse: it reloads a boundary state, recomputes the chunk's
`chunk` states into registers, then runs the adjoint recurrence
    g_t = dL/dh_t = a_{t+1} ⊙ g_{t+1} + dy_t C_t
back through them. Gradients of the per-(t, n) inputs B and C need sums over channels:
each program writes its partial sum and the wrapper adds the partials (deterministic, no
atomics). exp is computed as exp2 with A pre-scaled by log2(e) (one MUFU instruction).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    block_p: int = 32  # channels per program, a power of 2 (one per thread)
    chunk: int = 8  # steps per unrolled loop iteration; backward checkpoint interval
    num_warps: int = 0  # 0: block_p // 32 (at least 1)
    max_state_regs: int = 128  # chunk is lowered so that chunk * N <= this (backward registers)
    # Store a chunk's y (forward) only after its last step, and load a chunk's dy (backward) with
    # its x: without a store between them the compiler may issue every load of the chunk ahead
    # of the arithmetic (a store to y could alias the inputs as far as it knows).
    batch_stores: bool = False
    # Forward: issue the next chunk's x/Δ loads (carried to the next iteration) and this chunk's
    # B/C loads before any arithmetic, so memory latency overlaps a whole chunk of compute.
    # The chunk-parallel forward prefetches the next chunk's x, Δ, B, C tiles (on in PARALLEL_BLOCKS: 0.55-0.58
    # vs 0.59-0.64 ms on an H100, session 12). None: on when the sequence is segmented. On an H200 (2026-12-04,
    # the sequential kernel) it made 8 / 16 segments
    # 12% / 4% faster (0.94 vs 1.07 ms, 1.01 vs 1.04 ms, two runs) and one pass 19% slower.
    prefetch: bool | None = None
    # Forward: split the sequence into this many segments run as separate programs (more warps
    # to hide latency with): pass 1 computes each segment's end state from zero, a short scan over
    # segments gives every segment its start state, pass 2 is the ordinary forward per segment.
    # Costs a second read of x, Δ, B and a second exp per (step, channel, state) for all but the
    # last segment. 1: one pass; 0: auto (`auto_segments`).
    segments: int = 0
    # auto: the fewest segments (a power of 2, at most 64) that give this many programs, keeping at
    # least `min_segment_chunks` chunks per segment. On an H200 (2026-12-04, B8 L4096 D1536 N16, 384
    # programs in one pass, prefetch on) 1/2/4/8 segments took 2.95/2.67/1.49/0.94 ms, and 16/32/64
    # 1.01/1.12/1.42 ms in a second run: one program per 32 channels leaves ~3 warps per SM, too few to
    # hide the latency of each step's loads, and past ~3000 programs the second pass costs more than
    # the extra warps give. The default picks 8 segments at that shape.
    target_programs: int = 3072
    min_segment_chunks: int = 16
    # Forward only, experimental (not yet timed on a GPU): the state as one [N, block_p] tile per
    # program instead of N separate [block_p] vectors, so B_t and C_t are single [N] vector loads
    # (4 x 16-byte loads for N = 16 instead of 16 scalar ones) and the y reduction over N is a tile
    # sum. Needs N a power of 2.
    tile: bool = False
    # Forward only, experimental (not yet timed on a GPU): each program loads a chunk's x, Δ, B and C as
    # [chunk, .] tiles and scans the chunk's [chunk, N, block_p] recurrence in parallel along time with
    # Triton's own scan (kernels/ssm_scan/linrec.py), then carries the state to the next chunk. One pass
    # (the decays computed once), no per-step loads or dependent steps: the sequential kernels above wait
    # on each step (one pass ran at ~1450 cycles a step on an H100). Needs N a power of 2.
    parallel: bool = False
    # Backward chunk (its checkpoint interval), when smaller than `chunk`: the parallel forward stores
    # the state every this many steps, so a long parallel chunk (16+, the fast forward) does not make
    # the backward recompute 16 steps x N states in registers (its fwd+bwd was 36 ms at chunk 16 on an
    # H100, 2026-12-05, against ~14 at 8). 0: `chunk`. Must divide `chunk`; parallel forward only.
    bwd_chunk: int = 0
    # Channels per backward program (0: block_p), a power of 2. The backward keeps one channel per
    # thread, so the parallel forward's programs (4 threads per channel) would leave most of its
    # threads idle; its checkpoints do not depend on the forward's blocks.
    bwd_block_p: int = 0
    # Parallel forward: the chunk's start state enters the scan as step 0's input and its end state is
    # read with `take_last` (no instructions where time lies in each thread's registers), instead of a
    # cumulative decay product times the state added to every step and a masked sum over the chunk.
    carry_in: bool = True
    # Parallel forward: the tiles as [T, N_r, P_w, N_l, P_l] (N = N_r x N_l, block_p = P_w x P_l) instead of
    # [T, N, P]. Triton gives a tensor its default layout from the last axis back: lanes on P, then the rest of
    # the lanes and the warps on the next axis, which for [T, N, P] puts the warps on N, so the sum over N
    # for y crossed warps through shared memory (4 rounds, 8 barriers per iteration). With P split the lanes
    # run out on P_l x N_l and the warps land on P_w: the N sum is in registers (N_r) and shuffles (N_l).
    # Needs P_l = block_p / num_warps to divide 32 and N_l = 32 / P_l to divide N; off where they do not.
    split_n: bool = False
    # split_n forward: chunks per loop iteration (1 or 2). With prefetch, one chunk per iteration ends each
    # iteration moving the next chunk's tiles into the loop-carried registers (14-24 moves per chunk of ~510
    # instructions in the SASS for sm_90); two per iteration let the tiles alternate between two register sets.
    unroll: int = 1

    def split_shape(self, n: int) -> tuple[int, int, int, int]:
        """(N_r, P_w, N_l, P_l) of a resolved self with split_n (see split_n)."""
        pl_ = self.block_p // self.num_warps
        return n // (32 // pl_), self.num_warps, 32 // pl_, pl_

    def resolve(self, p: int, n: int) -> "GpuBlocks":
        if self.segments < 0:
            raise ValueError(f"GpuBlocks.segments must be >= 0 (0: auto), got {self.segments}")
        if (self.tile or self.parallel) and (n & (n - 1) or n < 2):
            raise ValueError(f"GpuBlocks(tile=True / parallel=True) needs a power-of-two state size N (Triton "
                             f"tiles), got N={n}")
        if self.parallel:
            from kernels.ssm_scan.linrec import TRITON_UNAVAILABLE

            if TRITON_UNAVAILABLE:
                raise ValueError(f"GpuBlocks(parallel=True) needs Triton's scan: {TRITON_UNAVAILABLE}")
        bp = min(self.block_p, 1 << max(0, p - 1).bit_length())
        chunk = max(1, min(self.chunk, self.max_state_regs // n))
        chunk = 1 << (chunk.bit_length() - 1)
        warps = self.num_warps or max(1, bp // 32)
        bc = min(self.bwd_chunk or chunk, chunk)  # chunk may have been lowered for a large N
        if bc & (bc - 1) or (bc != chunk and not self.parallel):
            raise ValueError(f"GpuBlocks.bwd_chunk must be a power of 2 dividing chunk={chunk}, and differ from it only "
                             f"with parallel=True; got {self.bwd_chunk}")
        bbp = min(self.bwd_block_p, 1 << max(0, p - 1).bit_length()) if self.bwd_block_p else bp
        if bbp & (bbp - 1):
            raise ValueError(f"GpuBlocks.bwd_block_p must be a power of 2, got {self.bwd_block_p}")
        split = self.split_n
        if split and not self.parallel:
            raise ValueError("GpuBlocks.split_n applies to the chunk-parallel forward only (parallel=True)")
        if split and not self.carry_in:
            raise ValueError("GpuBlocks.split_n carries the state in (carry_in=True); it has no session-11 carry")
        if self.unroll not in (1, 2) or (self.unroll == 2 and not split):
            raise ValueError(f"GpuBlocks.unroll must be 1, or 2 with split_n=True; got {self.unroll}")
        if split:  # where the channels or the state are too few to fill a warp's lanes, keep [T, N, P]
            p_l = bp // warps
            split = p_l >= 1 and 32 % p_l == 0 and n % (32 // p_l) == 0
        return dataclasses.replace(self, block_p=bp, chunk=chunk, num_warps=warps, bwd_chunk=bc, bwd_block_p=bbp,
                                   split_n=split, unroll=self.unroll if split else 1)

    def backward_blocks(self) -> "GpuBlocks":
        """The blocks the backward kernel runs with (a resolved self)."""
        if self.bwd_block_p == self.block_p and self.ck_every == self.chunk:
            return self
        bp = self.bwd_block_p or self.block_p
        return dataclasses.replace(self, block_p=bp, chunk=self.ck_every, num_warps=max(1, bp // 32), parallel=False,
                                   split_n=False)

    @property
    def ck_every(self) -> int:
        """Steps between the forward's stored states (the backward's chunk)."""
        return self.bwd_chunk or self.chunk


# The chunk-parallel forward on split tiles (32 channels over 4 warps, 16-step chunks, two chunks per loop
# iteration, the next chunk's loads issued ahead, the state carried into each chunk's scan) with the sequential
# backward at its usual width and chunk (32 channels, 8 steps). On an H100 (2026-12-05, session 13, B8 L4096 D1536
# N16 fp32, docs/data/h100_2026-12-05_s13/, the bench's warmed timing) 0.436 / 0.437 ms forward = 47.0 / 46.8% of the
# 0.205 ms floor and 14.17 ms forward + backward; session 12's default (16x16pck8j32w2, [T, N, P] tiles) 0.529 ms in
# the same run (with the earlier, shorter timing on three other H100s: 0.455-0.493 ms, 0.56 where timed first in its
# run, vs 0.54-0.61 for the old default).
PARALLEL_BLOCKS = GpuBlocks(block_p=32, chunk=16, num_warps=4, max_state_regs=256, parallel=True, split_n=True,
                            unroll=2, bwd_chunk=8, bwd_block_p=32, segments=1, prefetch=True)


def default_blocks(n: int) -> GpuBlocks:
    """The blocks `selective_scan(impl="pallas_gpu")` uses without any: PARALLEL_BLOCKS for the state sizes
    it was measured at (N a power of 2 up to 16, Triton's scan available), else `GpuBlocks()`."""
    from kernels.ssm_scan.linrec import TRITON_UNAVAILABLE

    if 2 <= n <= 16 and not n & (n - 1) and not TRITON_UNAVAILABLE:
        return PARALLEL_BLOCKS
    return GpuBlocks()


def auto_segments(blocks: GpuBlocks, programs: int, length: int) -> int:
    """Segments for `segments=0` (see GpuBlocks): `programs` is the one-pass program count."""
    s = 1
    while s < 64 and programs * s < blocks.target_programs and length >= 2 * s * blocks.chunk * blocks.min_segment_chunks:
        s *= 2
    return s


def _load_chunk(x_ref, dt_ref, bi, hi, cols, i, chunk: int):
    """x and Δ of chunk i in fp32, one [block_p] vector per step (a tuple each: loop carries)."""
    ts = [i * chunk + k for k in range(chunk)]
    return (tuple(x_ref[bi, t, hi, cols].astype(jnp.float32) for t in ts),
            tuple(dt_ref[bi, t, hi, cols].astype(jnp.float32) for t in ts))


def _segment_row(pid, segments: int):
    """Row of the [Bt·S, L/S, ...] view that pass-1 program `pid` reads (it covers segments 0..S-2)."""
    return (pid // (segments - 1)) * segments + pid % (segments - 1)


def _compiler_params(blocks: GpuBlocks):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1)


def _fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, h0_ref, y_ref, hT_ref, *ck, n_state, chunk, block_p,
                heads_per_group, batch_stores=False, prefetch=False):
    f32 = jnp.float32
    bi, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = hi // heads_per_group
    cols = pl.ds(pj * block_p, block_p)
    a2 = [a_ref[hi, n, cols] for n in range(n_state)]
    dd = d_ref[hi, cols]
    n_chunks = x_ref.shape[1] // chunk

    def load_xdt(i):
        return _load_chunk(x_ref, dt_ref, bi, hi, cols, i, chunk)

    def step_chunk(i, h, xs, dts):
        if prefetch:  # every B/C load of the chunk before the first dependent instruction
            bs = [[b_ref[bi, i * chunk + k, gi, n].astype(f32) for n in range(n_state)] for k in range(chunk)]
            cs = [[c_ref[bi, i * chunk + k, gi, n].astype(f32) for n in range(n_state)] for k in range(chunk)]
        ys = []
        for k in range(chunk):
            t = i * chunk + k
            xt, dtt = xs[k], dts[k]
            u = dtt * xt
            y = dd * xt
            for n in range(n_state):
                b = bs[k][n] if prefetch else b_ref[bi, t, gi, n].astype(f32)
                c = cs[k][n] if prefetch else c_ref[bi, t, gi, n].astype(f32)
                h[n] = jnp.exp2(dtt * a2[n]) * h[n] + u * b
                y = y + h[n] * c
            if batch_stores or prefetch:
                ys.append(y)
            else:
                y_ref[bi, t, hi, cols] = y.astype(y_ref.dtype)
        for k, y in enumerate(ys):
            y_ref[bi, i * chunk + k, hi, cols] = y.astype(y_ref.dtype)
        return h

    def save_ck(i, h):
        if ck:
            for n in range(n_state):
                ck[0][bi, hi, i, n, cols] = h[n]

    h0 = tuple(h0_ref[bi, hi, n, cols] for n in range(n_state))
    if prefetch:
        def body(i, carry):
            h, xs, dts = list(carry[0]), carry[1], carry[2]
            save_ck(i, h)
            nxt = load_xdt(jnp.minimum(i + 1, n_chunks - 1))  # issued now, used next iteration
            h = step_chunk(i, h, xs, dts)
            return (tuple(h), *nxt)

        h = jax.lax.fori_loop(0, n_chunks, body, (h0, *load_xdt(0)))[0]
    else:
        def body(i, h):
            h = list(h)
            save_ck(i, h)
            xs, dts = load_xdt(i)  # the chunk's x and Δ loads first: none depends on the state
            return tuple(step_chunk(i, h, xs, dts))

        h = jax.lax.fori_loop(0, n_chunks, body, h0)
    for n in range(n_state):
        hT_ref[bi, hi, n, cols] = h[n]


def _states_kernel(x_ref, dt_ref, a_ref, b_ref, hT_ref, dts_ref, *, n_state, chunk, block_p, heads_per_group,
                   segments):
    """Pass 1 of the segmented forward: a segment's end state from a zero start, and its Δ sum
    (the segment's decay is exp(A · ΣΔ)). Programs cover segments 0..S-2 of each sequence."""
    f32 = jnp.float32
    pid, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi = _segment_row(pid, segments)
    gi = hi // heads_per_group
    cols = pl.ds(pj * block_p, block_p)
    a2 = [a_ref[hi, n, cols] for n in range(n_state)]
    n_chunks = x_ref.shape[1] // chunk

    def body(i, carry):
        h, acc, xs, dts = list(carry[0]), carry[1], carry[2], carry[3]
        nxt = _load_chunk(x_ref, dt_ref, bi, hi, cols, jnp.minimum(i + 1, n_chunks - 1), chunk)
        bs = [[b_ref[bi, i * chunk + k, gi, n].astype(f32) for n in range(n_state)] for k in range(chunk)]
        for k in range(chunk):
            u = dts[k] * xs[k]
            acc = acc + dts[k]
            for n in range(n_state):
                h[n] = jnp.exp2(dts[k] * a2[n]) * h[n] + u * bs[k][n]
        return (tuple(h), acc, *nxt)

    zero = jnp.zeros((block_p,), f32)
    h, acc, _, _ = jax.lax.fori_loop(0, n_chunks, body, (tuple(zero for _ in range(n_state)), zero,
                                                         *_load_chunk(x_ref, dt_ref, bi, hi, cols, 0, chunk)))
    for n in range(n_state):
        hT_ref[pid, hi, n, cols] = h[n]
    dts_ref[pid, hi, cols] = acc


def _states_kernel_parallel(x_ref, dt_ref, a_ref, b_ref, hT_ref, dts_ref, *, n_state, chunk, block_p,
                            heads_per_group, segments):
    """`_states_kernel` scanning each chunk in parallel along time (GpuBlocks.parallel)."""
    from kernels.ssm_scan.linrec import linrec

    del n_state
    f32 = jnp.float32
    pid, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi = _segment_row(pid, segments)
    gi = hi // heads_per_group
    cols = pl.ds(pj * block_p, block_p)
    a2 = a_ref[hi, :, cols].astype(f32)  # [N, P]
    n_chunks = x_ref.shape[1] // chunk
    last = (jnp.arange(chunk, dtype=jnp.int32) == chunk - 1)[:, None, None]

    def body(i, carry):
        h, acc = carry
        ts = pl.ds(i * chunk, chunk)
        xs = x_ref[bi, ts, hi, cols].astype(f32)  # [T, P]
        dts = dt_ref[bi, ts, hi, cols].astype(f32)
        bs = b_ref[bi, ts, gi, :].astype(f32)  # [T, N]
        decay_to, h_from_zero = linrec(jnp.exp2(dts[:, None, :] * a2[None]), (dts * xs)[:, None, :] * bs[:, :, None],
                                       axis=0)
        h = jnp.sum(jnp.where(last, decay_to * h[None] + h_from_zero, 0.0), axis=0)
        return h, acc + jnp.sum(dts, axis=0)

    h, acc = jax.lax.fori_loop(0, n_chunks, body, (jnp.zeros(a2.shape, f32), jnp.zeros((block_p,), f32)))
    hT_ref[pid, hi, :, cols] = h
    dts_ref[pid, hi, cols] = acc


def _fwd_kernel_tile(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, h0_ref, y_ref, hT_ref, *ck, n_state, chunk, block_p,
                     heads_per_group, batch_stores=False, prefetch=False):
    """`_fwd_kernel` with the state as one [N, block_p] tile (GpuBlocks.tile)."""
    del batch_stores, prefetch  # this variant always loads a chunk ahead and stores y after the chunk
    f32 = jnp.float32
    bi, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = hi // heads_per_group
    cols = pl.ds(pj * block_p, block_p)
    a2 = a_ref[hi, :, cols]  # [N, P]
    dd = d_ref[hi, cols]
    n_chunks = x_ref.shape[1] // chunk

    def body(i, carry):
        h, xs, dts = carry
        if ck:
            ck[0][bi, hi, i, :, cols] = h
        nxt = _load_chunk(x_ref, dt_ref, bi, hi, cols, jnp.minimum(i + 1, n_chunks - 1), chunk)
        bs = [b_ref[bi, i * chunk + k, gi, :].astype(f32) for k in range(chunk)]
        cs = [c_ref[bi, i * chunk + k, gi, :].astype(f32) for k in range(chunk)]
        ys = []
        for k in range(chunk):
            h = jnp.exp2(dts[k][None, :] * a2) * h + (dts[k] * xs[k])[None, :] * bs[k][:, None]
            ys.append(dd * xs[k] + jnp.sum(h * cs[k][:, None], axis=0))
        for k, y in enumerate(ys):
            y_ref[bi, i * chunk + k, hi, cols] = y.astype(y_ref.dtype)
        return h, nxt[0], nxt[1]

    h = jax.lax.fori_loop(0, n_chunks, body,
                          (h0_ref[bi, hi, :, cols], *_load_chunk(x_ref, dt_ref, bi, hi, cols, 0, chunk)))[0]
    hT_ref[bi, hi, :, cols] = h


def _fwd_kernel_parallel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, h0_ref, y_ref, hT_ref, *ck, n_state, chunk,
                         block_p, heads_per_group, batch_stores=False, prefetch=False, ck_every=0, carry_in=True):
    """`_fwd_kernel` scanning each chunk in parallel along time (GpuBlocks.parallel); the state is
    stored every `ck_every` steps (default: each chunk) for the backward. With `prefetch` the next chunk's
    x, Δ, B and C loads are issued before this chunk's arithmetic (Triton pipelines only loads that feed
    a dot, so without it each iteration waits out the memory latency)."""
    from kernels.ssm_scan.linrec import linrec, take_last

    del batch_stores, n_state
    per = chunk // (ck_every or chunk)  # stored states per chunk
    f32 = jnp.float32
    bi, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = hi // heads_per_group
    cols = pl.ds(pj * block_p, block_p)
    a2 = a_ref[hi, :, cols].astype(f32)  # [N, P], A * log2(e)
    dd = d_ref[hi, cols].astype(f32)
    n_chunks = x_ref.shape[1] // chunk
    last = (jnp.arange(chunk, dtype=jnp.int32) == chunk - 1)[:, None, None]
    first = (jnp.arange(chunk, dtype=jnp.int32) == 0)[:, None, None]

    def load(i):  # x, Δ [T, P] and B, C [T, N] of chunk i
        ts = pl.ds(i * chunk, chunk)
        return x_ref[bi, ts, hi, cols], dt_ref[bi, ts, hi, cols], b_ref[bi, ts, gi, :], c_ref[bi, ts, gi, :]

    def body(i, carry):  # carry[0]: the state before chunk i, [N, P] ([1, N, P] with carry_in)
        h, tiles = (carry[0], carry[1:]) if prefetch else (carry, load(i))
        if prefetch:
            nxt = load(jnp.minimum(i + 1, n_chunks - 1))
        if ck:
            ck[0][bi, hi, i * per, :, cols] = take_last(h, 0) if carry_in else h
        ts = pl.ds(i * chunk, chunk)
        xs, dts, bs, cs = (a.astype(f32) for a in tiles)
        decay = jnp.exp2(dts[:, None, :] * a2[None])  # [T, N, P]
        inp = (dts * xs)[:, None, :] * bs[:, :, None]
        if carry_in:  # step 0's input takes the carried state; the other steps' selects fold away
            _, hs = linrec(decay, jnp.where(first, decay * h + inp, inp), axis=0)
        else:
            decay_to, h_from_zero = linrec(decay, inp, axis=0)
            hs = decay_to * h[None] + h_from_zero  # the state after each step of the chunk
        y_ref[bi, ts, hi, cols] = (jnp.sum(hs * cs[:, :, None], axis=1) + dd[None] * xs).astype(y_ref.dtype)
        if ck:  # the states before steps ck_every, 2 ck_every, ... of the chunk (no slicing in Triton)
            for j in range(1, per):
                at = (jnp.arange(chunk, dtype=jnp.int32) == j * ck_every - 1)[:, None, None]
                ck[0][bi, hi, i * per + j, :, cols] = jnp.sum(jnp.where(at, hs, 0.0), axis=0)
        if carry_in:  # kept 3-D so the loop carries it in the layout of the chunk's tiles
            h = take_last(hs, 0)[None]
        else:
            h = jnp.sum(jnp.where(last, hs, 0.0), axis=0)  # the last step's state
        return (h, *nxt) if prefetch else h

    h0 = h0_ref[bi, hi, :, cols].astype(f32)
    h0 = h0[None] if carry_in else h0
    out = jax.lax.fori_loop(0, n_chunks, body, (h0, *load(0)) if prefetch else h0)
    hT = out[0] if prefetch else out
    hT_ref[bi, hi, :, cols] = take_last(hT, 0) if carry_in else hT


def _fwd_kernel_split(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, h0_ref, y_ref, hT_ref, *ck, chunk, heads_per_group,
                      prefetch, ck_every, unroll=1):
    """`_fwd_kernel_parallel` (state carried in) on [T, N_r, P_w, N_l, P_l] tiles (GpuBlocks.split_n). The refs
    are views the wrapper arranged: x, Δ, y [Bt, L, H, P/block_p, P_w, P_l]; B, C [Bt, L, G, N_r, N_l]; A, h0,
    hT and the stored states with [N_r, P_w, N_l, P_l] last, D with [P_w, P_l]."""
    from kernels.ssm_scan.linrec import linrec, take_last

    per = chunk // ck_every
    f32 = jnp.float32
    bi, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = hi // heads_per_group
    a2 = a_ref[hi, pj, :, :, :, :].astype(f32)  # [N_r, P_w, N_l, P_l], A * log2(e)
    dd = d_ref[hi, pj, :, :].astype(f32)
    n_chunks = x_ref.shape[1] // chunk
    steps = jnp.arange(chunk, dtype=jnp.int32)[:, None, None, None, None]
    on_p = lambda a: a[:, None, :, None, :]  # [T, P_w, P_l] -> [T, 1, P_w, 1, P_l]
    on_n = lambda a: a[:, :, None, :, None]  # [T, N_r, N_l] -> [T, N_r, 1, N_l, 1]

    def load(i):
        ts = pl.ds(i * chunk, chunk)
        return (x_ref[bi, ts, hi, pj, :, :], dt_ref[bi, ts, hi, pj, :, :], b_ref[bi, ts, gi, :, :],
                c_ref[bi, ts, gi, :, :])

    def body(i, carry):  # carry[0]: the state before chunk i, [1, N_r, P_w, N_l, P_l]
        h, tiles = (carry[0], carry[1:]) if prefetch else (carry, load(i))
        if prefetch:
            nxt = load(jnp.minimum(i + 1, n_chunks - 1))
        if ck:
            ck[0][bi, hi, i * per, pj, :, :, :, :] = take_last(h, 0)
        xs, dts, bs, cs = (a.astype(f32) for a in tiles)
        decay = jnp.exp2(on_p(dts) * a2[None])
        inp = on_p(dts * xs) * on_n(bs)
        _, hs = linrec(decay, jnp.where(steps == 0, decay * h + inp, inp), axis=0)
        # N_r (registers) first, then N_l (lanes): the other order would shuffle every register
        y = jnp.sum(jnp.sum(hs * on_n(cs), axis=1), axis=2) + dd[None] * xs
        y_ref[bi, pl.ds(i * chunk, chunk), hi, pj, :, :] = y.astype(y_ref.dtype)
        if ck:  # the states before steps ck_every, 2 ck_every, ... of the chunk
            for j in range(1, per):
                ck[0][bi, hi, i * per + j, pj, :, :, :, :] = jnp.sum(jnp.where(steps == j * ck_every - 1, hs, 0.0),
                                                                     axis=0)
        h = take_last(hs, 0)[None]
        return (h, *nxt) if prefetch else h

    h0 = h0_ref[bi, hi, pj, :, :, :, :].astype(f32)[None]
    carry = (h0, *load(0)) if prefetch else h0
    if unroll == 2:  # two chunks per iteration: the prefetched tiles alternate registers instead of being moved
        carry = jax.lax.fori_loop(0, n_chunks // 2, lambda k, c: body(2 * k + 1, body(2 * k, c)), carry)
        out = body(n_chunks - 1, carry) if n_chunks % 2 else carry
    else:
        out = jax.lax.fori_loop(0, n_chunks, body, carry)
    hT_ref[bi, hi, pj, :, :, :, :] = take_last(out[0] if prefetch else out, 0)


def _states_kernel_tile(x_ref, dt_ref, a_ref, b_ref, hT_ref, dts_ref, *, n_state, chunk, block_p, heads_per_group,
                        segments):
    """`_states_kernel` with the state as one [N, block_p] tile (GpuBlocks.tile)."""
    f32 = jnp.float32
    pid, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi = _segment_row(pid, segments)
    gi = hi // heads_per_group
    cols = pl.ds(pj * block_p, block_p)
    a2 = a_ref[hi, :, cols]
    n_chunks = x_ref.shape[1] // chunk

    def body(i, carry):
        h, acc, xs, dts = carry
        nxt = _load_chunk(x_ref, dt_ref, bi, hi, cols, jnp.minimum(i + 1, n_chunks - 1), chunk)
        bs = [b_ref[bi, i * chunk + k, gi, :].astype(f32) for k in range(chunk)]
        for k in range(chunk):
            acc = acc + dts[k]
            h = jnp.exp2(dts[k][None, :] * a2) * h + (dts[k] * xs[k])[None, :] * bs[k][:, None]
        return h, acc, nxt[0], nxt[1]

    h, acc, _, _ = jax.lax.fori_loop(0, n_chunks, body, (jnp.zeros((n_state, block_p), f32), jnp.zeros((block_p,), f32),
                                                         *_load_chunk(x_ref, dt_ref, bi, hi, cols, 0, chunk)))
    hT_ref[pid, hi, :, cols] = h
    dts_ref[pid, hi, cols] = acc


def _bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, ck_ref, dy_ref, dhT_ref,
                dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref, dh0_ref, *, n_state, chunk, block_p,
                heads_per_group, batch_stores=False):
    f32 = jnp.float32
    N = n_state
    bi, hi, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = hi // heads_per_group
    cols = pl.ds(pj * block_p, block_p)
    a2 = [a_ref[hi, n, cols] for n in range(N)]
    dd = d_ref[hi, cols]
    n_chunks = x_ref.shape[1] // chunk
    zero = jnp.zeros((block_p,), f32)

    def body(j, carry):
        gh, dA, dD = list(carry[0]), list(carry[1]), carry[2]
        i = n_chunks - 1 - j
        # recompute the chunk's states: hs[k] is the state before step k
        hs = [[ck_ref[bi, hi, i, n, cols] for n in range(N)]]
        xs, dts, us, bs = [], [], [], []
        # the chunk's x and Δ loads first: none depends on the state, so they overlap
        xs = [x_ref[bi, i * chunk + k, hi, cols].astype(f32) for k in range(chunk)]
        dts = [dt_ref[bi, i * chunk + k, hi, cols].astype(f32) for k in range(chunk)]
        for k in range(chunk):
            t = i * chunk + k
            xt, dtt = xs[k], dts[k]
            u = dtt * xt
            b = [b_ref[bi, t, gi, n].astype(f32) for n in range(N)]
            hs.append([jnp.exp2(dtt * a2[n]) * hs[-1][n] + u * b[n] for n in range(N)])
            xs.append(xt), dts.append(dtt), us.append(u), bs.append(b)
        if batch_stores:
            dys = [dy_ref[bi, i * chunk + k, hi, cols].astype(f32) for k in range(chunk)]
        for k in reversed(range(chunk)):
            t = i * chunk + k
            dy = dys[k] if batch_stores else dy_ref[bi, t, hi, cols].astype(f32)
            xt, dtt, u, b = xs[k], dts[k], us[k], bs[k]
            du, dlog = zero, zero
            for n in range(N):
                g = gh[n] + dy * c_ref[bi, t, gi, n].astype(f32)
                dc_ref[bi, t, hi, pj, n] = jnp.sum(dy * hs[k + 1][n])
                db_ref[bi, t, hi, pj, n] = jnp.sum(g * u)
                du = du + g * b[n]
                a = jnp.exp2(dtt * a2[n])
                s = g * hs[k][n] * a  # dL/d(Δ A) for this (channel, n)
                dlog = dlog + s * a2[n]
                dA[n] = dA[n] + s * dtt
                gh[n] = a * g
            dx_ref[bi, t, hi, cols] = (du * dtt + dd * dy).astype(dx_ref.dtype)
            ddt_ref[bi, t, hi, cols] = (du * xt + dlog * LN2).astype(ddt_ref.dtype)
            dD = dD + dy * xt
        return tuple(gh), tuple(dA), dD

    init = (tuple(dhT_ref[bi, hi, n, cols] for n in range(N)), tuple(zero for _ in range(N)), zero)
    gh, dA, dD = jax.lax.fori_loop(0, n_chunks, body, init)
    for n in range(N):
        dh0_ref[bi, hi, n, cols] = gh[n]
        da_ref[bi, hi, n, cols] = dA[n]
    dd_ref[bi, hi, cols] = dD


def _statics(x, B, blocks: GpuBlocks):
    bt, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    return bt, l, h, p, g, n, (bt, h, p // blocks.block_p)


def _forward(x, dt, At, B, C, D, h0T, blocks: GpuBlocks, interpret: bool, save: bool):
    if blocks.segments > 1:
        return _forward_segmented(x, dt, At, B, C, D, h0T, blocks, interpret, save)
    if blocks.split_n:  # resolve() allows it with parallel=True only
        return _forward_split(x, dt, At, B, C, D, h0T, blocks, interpret, save)
    bt, l, h, p, g, n, grid = _statics(x, B, blocks)
    f32 = jnp.float32
    outs = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((bt, h, n, p), f32)]
    if save:
        outs.append(jax.ShapeDtypeStruct((bt, h, l // blocks.ck_every, n, p), f32))
    fwd = _fwd_kernel_parallel if blocks.parallel else _fwd_kernel_tile if blocks.tile else _fwd_kernel
    extra = {"ck_every": blocks.ck_every, "carry_in": blocks.carry_in} if blocks.parallel else {}
    kernel = functools.partial(fwd, n_state=n, chunk=blocks.chunk, **extra,
                               block_p=blocks.block_p, heads_per_group=h // g, batch_stores=blocks.batch_stores,
                               prefetch=blocks.prefetch)
    return pl.pallas_call(kernel, out_shape=tuple(outs), grid=grid, interpret=interpret,
                          compiler_params=_compiler_params(blocks), name="ssm_scan_fwd")(
        x, dt, At * jnp.float32(LOG2E), B, C, D, h0T)


def _forward_split(x, dt, At, B, C, D, h0T, blocks: GpuBlocks, interpret: bool, save: bool):
    """The one-pass forward with GpuBlocks.split_n: the same outputs, through the kernel's views (x, Δ, B, C,
    y by free reshapes; A, D, h0, hT and the stored states rearranged here, all small but the states, which
    only the training forward writes)."""
    bt, l, h, p, g, n, grid = _statics(x, B, blocks)
    nr, pw, nl, pl_ = blocks.split_shape(n)
    npb = grid[2]  # channel blocks
    f32 = jnp.float32
    on_p = lambda a: a.reshape(*a.shape[:-1], npb, pw, pl_)  # [..., P] -> [..., P/bp, P_w, P_l]
    # [..., N, P] -> [..., P/bp, N_r, P_w, N_l, P_l] and back
    to_tiles = lambda a: jnp.moveaxis(on_p(a.reshape(*a.shape[:-2], nr, nl, p)), -3, -5).swapaxes(-3, -2)
    from_tiles = lambda a: jnp.moveaxis(a.swapaxes(-3, -2), -5, -3).reshape(*a.shape[:-5], n, p)
    a_t = to_tiles(At * f32(LOG2E))
    outs = [jax.ShapeDtypeStruct(on_p(x).shape, x.dtype), jax.ShapeDtypeStruct((bt, h, npb, nr, pw, nl, pl_), f32)]
    if save:
        outs.append(jax.ShapeDtypeStruct((bt, h, l // blocks.ck_every, npb, nr, pw, nl, pl_), f32))
    kernel = functools.partial(_fwd_kernel_split, chunk=blocks.chunk, heads_per_group=h // g,
                               prefetch=blocks.prefetch, ck_every=blocks.ck_every, unroll=blocks.unroll)
    res = pl.pallas_call(kernel, out_shape=tuple(outs), grid=grid, interpret=interpret,
                         compiler_params=_compiler_params(blocks), name="ssm_scan_fwd")(
        on_p(x), on_p(dt), a_t, B.reshape(bt, l, g, nr, nl), C.reshape(bt, l, g, nr, nl), on_p(D),
        to_tiles(h0T))
    return (res[0].reshape(x.shape), *(from_tiles(r) for r in res[1:]))


def _forward_segmented(x, dt, At, B, C, D, h0T, blocks: GpuBlocks, interpret: bool, save: bool):
    """The forward with the sequence cut in `blocks.segments` segments (see GpuBlocks); same outputs."""
    bt, l, h, p, g, n, _ = _statics(x, B, blocks)
    s = blocks.segments
    ls = l // s  # the caller pads L to a multiple of segments * chunk
    f32 = jnp.float32
    seg = lambda a: a.reshape(bt * s, ls, *a.shape[2:])  # free: contiguous
    xs, dts, Bs, Cs = seg(x), seg(dt), seg(B), seg(C)
    states = _states_kernel_parallel if blocks.parallel else _states_kernel_tile if blocks.tile else _states_kernel
    kernel = functools.partial(states, n_state=n, chunk=blocks.chunk,
                               block_p=blocks.block_p, heads_per_group=h // g, segments=s)
    h_loc, dt_sum = pl.pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct((bt * (s - 1), h, n, p), f32),
                           jax.ShapeDtypeStruct((bt * (s - 1), h, p), f32)),
        grid=(bt * (s - 1), h, p // blocks.block_p), interpret=interpret,
        compiler_params=_compiler_params(blocks), name="ssm_scan_segment_states")(
        xs, dts, At * jnp.float32(LOG2E), Bs)
    h_loc = h_loc.reshape(bt, s - 1, h, n, p)
    decay = jnp.exp(At[None, None] * dt_sum.reshape(bt, s - 1, h, 1, p))

    def carry(hc, inp):  # start state of the next segment
        a, hl = inp
        nxt = a * hc + hl
        return nxt, nxt

    _, starts = jax.lax.scan(carry, h0T.astype(f32), (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(h_loc, 1, 0)))
    h0s = jnp.concatenate([h0T[:, None].astype(f32), jnp.moveaxis(starts, 0, 1)], axis=1).reshape(bt * s, h, n, p)
    outs = _forward(xs, dts, At, Bs, Cs, D, h0s, dataclasses.replace(blocks, segments=1), interpret, save)
    y = outs[0].reshape(x.shape)
    hT = outs[1].reshape(bt, s, h, n, p)[:, -1]
    if not save:
        return y, hT
    lc = ls // blocks.ck_every  # checkpoints in the layout of the one-pass forward: [Bt, H, L/every, N, P]
    ck = jnp.moveaxis(outs[2].reshape(bt, s, h, lc, n, p), 1, 2).reshape(bt, h, s * lc, n, p)
    return y, hT, ck


def _backward(x, dt, At, B, C, D, ck, dy, dhT, blocks: GpuBlocks, interpret: bool):
    blocks = blocks.backward_blocks()
    bt, l, h, p, g, n, grid = _statics(x, B, blocks)
    f32 = jnp.float32
    npb = p // blocks.block_p
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(dt.shape, dt.dtype),
            jax.ShapeDtypeStruct((bt, l, h, npb, n), f32), jax.ShapeDtypeStruct((bt, l, h, npb, n), f32),
            jax.ShapeDtypeStruct((bt, h, n, p), f32), jax.ShapeDtypeStruct((bt, h, p), f32),
            jax.ShapeDtypeStruct((bt, h, n, p), f32))
    kernel = functools.partial(_bwd_kernel, n_state=n, chunk=blocks.chunk, block_p=blocks.block_p,
                               heads_per_group=h // g, batch_stores=blocks.batch_stores)
    dx, ddt, db, dc, da, dd, dh0 = pl.pallas_call(
        kernel, out_shape=outs, grid=grid, interpret=interpret, compiler_params=_compiler_params(blocks),
        name="ssm_scan_bwd")(x, dt, At * jnp.float32(LOG2E), B, C, D, ck, dy, dhT.astype(f32))
    # partial sums over channel blocks and the heads of each group
    db = db.reshape(bt, l, g, (h // g) * npb, n).sum(3).astype(B.dtype)
    dc = dc.reshape(bt, l, g, (h // g) * npb, n).sum(3).astype(C.dtype)
    return dx, ddt, da.sum(0), db, dc, dd.sum(0), dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _scan(x, dt, At, B, C, D, h0T, blocks, interpret):
    y, hT = _forward(x, dt, At, B, C, D, h0T, blocks, interpret, save=False)
    return y, hT


def _scan_fwd(x, dt, At, B, C, D, h0T, blocks, interpret):
    y, hT, ck = _forward(x, dt, At, B, C, D, h0T, blocks, interpret, save=True)
    return (y, hT), (x, dt, At, B, C, D, ck)


def _scan_bwd(blocks, interpret, res, cts):
    x, dt, At, B, C, D, ck = res
    dy, dhT = cts
    return _backward(x, dt, At, B, C, D, ck, dy, dhT, blocks, interpret)


_scan.defvjp(_scan_fwd, _scan_bwd)


def resolve_blocks(blocks: GpuBlocks, bt: int, l: int, h: int, p: int, n: int) -> GpuBlocks:
    """`blocks` with every automatic choice made for x [bt, l, h, p] and state size n (idempotent)."""
    blocks = blocks.resolve(p, n)
    if blocks.segments == 0:
        blocks = dataclasses.replace(blocks, segments=auto_segments(blocks, bt * h * -(-p // blocks.block_p), l))
    if blocks.prefetch is None:
        blocks = dataclasses.replace(blocks, prefetch=blocks.segments > 1)
    return blocks


def scan_canonical(x, dt, A, B, C, D, h0, *, blocks: GpuBlocks | None = None, interpret: bool = False):
    """Canonical layout (see reference.py) in, (y, final state [Bt, H, P, N] fp32) out; blocks default to
    `default_blocks(N)`."""
    bt, l, h, p = x.shape
    n = A.shape[-1]
    blocks = resolve_blocks(blocks or default_blocks(n), bt, l, h, p, n)
    pad_l, pad_p = (-l) % (blocks.chunk * blocks.segments), (-p) % max(blocks.block_p, blocks.bwd_block_p)
    At, h0T = jnp.swapaxes(A, 1, 2), jnp.swapaxes(h0, 2, 3)
    if pad_l:  # Δ = 0 and x = 0 past the end leave the state unchanged
        x, dt, B, C = (jnp.pad(a, [(0, 0), (0, pad_l), (0, 0), (0, 0)]) for a in (x, dt, B, C))
    if pad_p:  # padded channels carry zeros
        x, dt = (jnp.pad(a, [(0, 0), (0, 0), (0, 0), (0, pad_p)]) for a in (x, dt))
        At = jnp.pad(At, [(0, 0), (0, 0), (0, pad_p)])
        D = jnp.pad(D, [(0, 0), (0, pad_p)])
        h0T = jnp.pad(h0T, [(0, 0), (0, 0), (0, 0), (0, pad_p)])
    y, hT = _scan(x, dt, At, B, C, D, h0T, blocks, interpret)
    return y[:, :l, :, :p], jnp.swapaxes(hT, 2, 3)[:, :, :p]


def hbm_bytes(bt: int, l: int, d: int, n: int, itemsize: int) -> int:
    """Bytes a Mamba-1 forward must move at least: read x, Δ, B, C and write y once."""
    return itemsize * (3 * bt * l * d + 2 * bt * l * n) + 4 * d * n


def supported(x) -> bool:
    return math.prod(x.shape) < 2**31
