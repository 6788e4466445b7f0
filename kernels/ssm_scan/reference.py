"""Selective scan (the SSM of Mamba), pure jnp: the definition every kernel is tested against.

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_t        y_t = h_t C_t + D x_t

Two input layouts share one canonical form:
- Mamba-1: x, Δ [Bt, L, D]; A [D, N]; B, C [Bt, L, N]; D [D]; state [Bt, D, N]
  (per-channel Δ, B/C shared by all channels).
- multi-head (Mamba-2 layout): x [Bt, L, H, P]; Δ [Bt, L, H]; A [H]; B, C [Bt, L, G, N]
  with H % G == 0 (grouped like GQA); D [H]; state [Bt, H, P, N] (scalar A and Δ per head).
The canonical form is x, Δ [Bt, L, H, P], A [H, P, N], B, C [Bt, L, G, N], D [H, P],
state [Bt, H, P, N]: Mamba-1 is H = G = 1, P = D; multi-head broadcasts Δ and A over P (and N).
Kernels work on the canonical form; the broadcasts are plain jnp, so autodiff sums the
gradients of Δ, A and D back to the caller's shapes.

All arithmetic is fp32 whatever the input dtype; y has x's dtype, the state is fp32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Canonical:
    x: jax.Array  # [Bt, L, H, P]
    dt: jax.Array  # [Bt, L, H, P]
    A: jax.Array  # [H, P, N] fp32
    B: jax.Array  # [Bt, L, G, N]
    C: jax.Array  # [Bt, L, G, N]
    D: jax.Array  # [H, P] fp32
    h0: jax.Array  # [Bt, H, P, N] fp32
    multihead: bool  # the caller's layout, to shape y and the final state back


def _fail(msg: str):
    raise ValueError(f"selective_scan: {msg}")


def canonicalize(x, dt, A, B, C, D=None, initial_state=None) -> Canonical:
    """Check shapes (clear errors for bad input) and bring both layouts to the canonical form."""
    shapes = {n: getattr(a, "shape", None) for n, a in
              dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state).items()}
    if x.ndim == 3:
        bt, l, d = x.shape
        if A.ndim != 2:
            _fail(f"Mamba-1 layout (x [Bt, L, D]) needs A [D, N]; got shapes {shapes}")
        n = A.shape[1]
        if dt.shape != x.shape:
            _fail(f"dt must have x's shape {x.shape} (per-channel Δ); got {dt.shape}")
        if A.shape[0] != d:
            _fail(f"A {A.shape} must be [D={d}, N]")
        for name, m in (("B", B), ("C", C)):
            if m.ndim != 3 or m.shape[:2] != (bt, l):
                _fail(f"{name} must be [Bt={bt}, L={l}, N]; got {m.shape}")
            if m.shape[2] != n:
                _fail(f"state size mismatch: A has N={n} but {name} has {m.shape[2]}")
        if D is not None and D.shape != (d,):
            _fail(f"D must be [D={d}]; got {D.shape}")
        if initial_state is not None and initial_state.shape != (bt, d, n):
            _fail(f"initial_state must be [Bt, D, N] = {(bt, d, n)}; got {initial_state.shape}")
        h, p, g = 1, d, 1
        xc, dtc = x[:, :, None, :], dt[:, :, None, :]
        ac = A.astype(jnp.float32)[None]
        bc, cc = B[:, :, None, :], C[:, :, None, :]
        dc = None if D is None else D.astype(jnp.float32)[None]
        h0 = None if initial_state is None else initial_state.astype(jnp.float32)[:, None]
        multihead = False
    elif x.ndim == 4:
        bt, l, h, p = x.shape
        if A.ndim != 1 or A.shape[0] != h:
            _fail(f"multi-head layout (x [Bt, L, H, P]) needs A [H={h}] (one scalar per head); got {A.shape}")
        if dt.shape != (bt, l, h):
            _fail(f"dt must be [Bt, L, H] = {(bt, l, h)} in the multi-head layout; got {dt.shape}")
        if B.ndim != 4 or B.shape[:2] != (bt, l):
            _fail(f"B must be [Bt={bt}, L={l}, G, N]; got {B.shape}")
        g, n = B.shape[2], B.shape[3]
        if C.shape != B.shape:
            _fail(f"C {C.shape} must match B {B.shape}" + (
                " (state size mismatch)" if C.ndim == 4 and C.shape[3] != n else ""))
        if h % g:
            _fail(f"heads H={h} must be a multiple of the B/C groups G={g}")
        if D is not None and D.shape != (h,):
            _fail(f"D must be [H={h}]; got {D.shape}")
        if initial_state is not None and initial_state.shape != (bt, h, p, n):
            _fail(f"initial_state must be [Bt, H, P, N] = {(bt, h, p, n)}; got {initial_state.shape}")
        xc = x
        dtc = jnp.broadcast_to(dt[..., None], x.shape)
        ac = jnp.broadcast_to(A.astype(jnp.float32)[:, None, None], (h, p, n))
        bc, cc = B, C
        dc = None if D is None else jnp.broadcast_to(D.astype(jnp.float32)[:, None], (h, p))
        h0 = None if initial_state is None else initial_state.astype(jnp.float32)
        multihead = True
    else:
        _fail(f"x must be [Bt, L, D] (Mamba-1) or [Bt, L, H, P] (multi-head); got {x.shape}")
    if l < 1:
        _fail("empty sequence (L = 0)")
    if n < 1:
        _fail("state size N must be >= 1")
    for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            _fail(f"{name} must be floating point; got {a.dtype}")
    if dc is None:
        dc = jnp.zeros((h, p), jnp.float32)
    if h0 is None:
        h0 = jnp.zeros((bt, h, p, n), jnp.float32)
    return Canonical(xc, dtc, ac, bc, cc, dc, h0, multihead)


def restore(c: Canonical, y, h_final):
    """Canonical outputs back to the caller's layout."""
    if c.multihead:
        return y, h_final
    return y[:, :, 0, :], h_final[:, 0]


def _per_head(m, heads: int):
    """B or C [Bt, L, G, N] -> [Bt, L, H, N] (head h reads group h // (H / G))."""
    return jnp.repeat(m, heads // m.shape[2], axis=2)


def scan_canonical(x, dt, A, B, C, D, h0):
    """Sequential lax.scan over time: the reference. Returns (y [Bt, L, H, P], h [Bt, H, P, N])."""
    f32 = jnp.float32
    heads = x.shape[2]
    Bh, Ch = _per_head(B, heads).astype(f32), _per_head(C, heads).astype(f32)

    def step(h, inp):
        xt, dtt, bt, ct = inp  # [Bt, H, P], [Bt, H, P], [Bt, H, N], [Bt, H, N]
        h = jnp.exp(dtt[..., None] * A) * h + (dtt * xt)[..., None] * bt[:, :, None, :]
        y = jnp.sum(h * ct[:, :, None, :], axis=-1) + D * xt
        return h, y

    seq = tuple(jnp.moveaxis(a, 1, 0) for a in (x.astype(f32), dt.astype(f32), Bh, Ch))
    h, y = jax.lax.scan(step, h0, seq)
    return jnp.moveaxis(y, 0, 1).astype(x.dtype), h


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _assoc_block(x, dt, A, Bh, Ch, D, h0):
    """associative_scan over the whole time axis of one block; inputs fp32."""
    a = jnp.exp(dt[..., None] * A)  # [Bt, T, H, P, N]
    b = (dt * x)[..., None] * Bh[:, :, :, None, :]
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, hs = jax.lax.associative_scan(_combine, (a, b), axis=1)
    y = jnp.sum(hs * Ch[:, :, :, None, :], axis=-1) + D * x
    return y, hs[:, -1]


def scan_associative(x, dt, A, B, C, D, h0):
    """One associative_scan over all of L: materializes [Bt, L, H, P, N] several times over."""
    f32 = jnp.float32
    heads = x.shape[2]
    y, h = _assoc_block(x.astype(f32), dt.astype(f32), A, _per_head(B, heads).astype(f32),
                        _per_head(C, heads).astype(f32), D, h0)
    return y.astype(x.dtype), h


def scan_chunked(x, dt, A, B, C, D, h0, *, chunk: int = 128):
    """lax.scan over chunks of `chunk` steps, associative_scan inside each: the XLA path.

    The chunk body is rematerialized in the backward pass, so memory is O(Bt·chunk·H·P·N)
    instead of O(Bt·L·H·P·N).
    """
    f32 = jnp.float32
    bt, l, heads, p = x.shape
    chunk = min(chunk, l)
    pad = (-l) % chunk
    Bh, Ch = _per_head(B, heads).astype(f32), _per_head(C, heads).astype(f32)
    seq = [x.astype(f32), dt.astype(f32), Bh, Ch]
    if pad:  # Δ = 0 past the end: the state is carried through unchanged
        seq = [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in seq]
    nc = (l + pad) // chunk
    seq = [jnp.moveaxis(a.reshape(bt, nc, chunk, *a.shape[2:]), 1, 0) for a in seq]

    @jax.checkpoint
    def body(h, inp):
        xc, dtc, bc, cc = inp
        y, h = _assoc_block(xc, dtc, A, bc, cc, D, h)
        return h, y

    h, y = jax.lax.scan(body, h0, tuple(seq))
    y = jnp.moveaxis(y, 0, 1).reshape(bt, l + pad, heads, p)[:, :l]
    return y.astype(x.dtype), h


def selective_scan(x, dt, A, B, C, D=None, *, initial_state=None, return_final_state: bool = False,
                   method: str = "scan"):
    """The reference in the caller's layout; `method` is "scan" | "associative" | "chunked"."""
    c = canonicalize(x, dt, A, B, C, D, initial_state)
    fn = {"scan": scan_canonical, "associative": scan_associative, "chunked": scan_chunked}[method]
    y, h = restore(c, *fn(c.x, c.dt, c.A, c.B, c.C, c.D, c.h0))
    return (y, h) if return_final_state else y


def step(state, x, dt, A, B, C, D=None):
    """One recurrent step (decoding): the same maths for a single time step, no L axis.

    Mamba-1: state [Bt, D, N], x/dt [Bt, D], A [D, N], B/C [Bt, N].
    multi-head: state [Bt, H, P, N], x [Bt, H, P], dt [Bt, H], A [H], B/C [Bt, G, N].
    Returns (y like x, new state fp32).
    """
    c = canonicalize(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, state)
    f32 = jnp.float32
    heads = c.x.shape[2]
    xt, dtt = c.x[:, 0].astype(f32), c.dt[:, 0].astype(f32)
    bt, ct = _per_head(c.B, heads)[:, 0].astype(f32), _per_head(c.C, heads)[:, 0].astype(f32)
    h = jnp.exp(dtt[..., None] * c.A) * c.h0 + (dtt * xt)[..., None] * bt[:, :, None, :]
    y = jnp.sum(h * ct[:, :, None, :], axis=-1) + c.D * xt
    y, h = restore(c, y[:, None].astype(x.dtype), h)
    return y[:, 0], h
