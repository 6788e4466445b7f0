"""`linear`, `embed` and `unembed`: the only places a model touches a weight matrix.

Each dispatches on the weight's Python type, so a quantized or sparse weight (a pytree node
registered here by its own module) runs through the unchanged model. A plain array is the
default. Weights are laid out `[in, out]` for linear and `[vocab, dim]` for embeddings.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import functools
import math

import jax
import jax.numpy as jnp

from flashit_jax.nn.norms import rms_norm
from kernels.gemv import api as gemv


class WeightOps(NamedTuple):
    linear: Callable[[jax.Array, Any], jax.Array] | None = None  # (x [..., in], w) -> [..., out]
    embed: Callable[[jax.Array, Any], jax.Array] | None = None  # (ids [...], w) -> [..., dim]
    unembed: Callable[[jax.Array, Any], jax.Array] | None = None  # (x [..., dim], w) -> [..., vocab] fp32
    # (x, w, *, norm, glu, residual) -> `linear`'s result with those fused into the decode GEMV, or None
    # where this weight's kernel cannot take them (linear then computes them around `linear`)
    linear_fused: Callable[..., jax.Array | None] | None = None


_OPS: dict[type, WeightOps] = {}


def register_weight_type(cls: type, ops: WeightOps) -> None:
    """Make `linear`/`embed`/`unembed` accept weights of type `cls` (e.g. QArray)."""
    _OPS[cls] = ops


def _ops(w) -> WeightOps | None:
    return _OPS.get(type(w))


def weight_shape(w) -> tuple[int, ...]:
    """Logical shape of a weight, plain or packed (packed types expose `.shape`)."""
    return tuple(w.shape)


def _dense(w, dtype):
    return w if w.dtype == dtype else w.astype(dtype)


def _rows(x) -> int:
    return math.prod(x.shape[:-1])


# fp32 products of low-precision operands. Autodiff of einsum(..., preferred_element_type=fp32) hands the
# transposed products an fp32 cotangent against a bf16 operand, which XLA runs as fp32 (TF32) GEMMs: on an
# H200 (2026-12-04, train.bench --profile) they took 60% of a Llama-3.2-1B training step. The backward here
# rounds the cotangent to the operands' dtype first, so all three products of a layer are bf16 GEMMs with
# fp32 accumulation (the usual mixed-precision rule); fp32 operands keep plain autodiff.
_DX_DW = {"...i,io->...o": ("...o,io->...i", "...i,...o->io"),  # linear: w [in, out]
          "...d,vd->...v": ("...v,vd->...d", "...d,...v->vd")}  # unembed: w [vocab, dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lowp_einsum(eq: str, out_dtype, x, w):
    return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)


def _lowp_fwd(eq, out_dtype, x, w):
    return _lowp_einsum(eq, out_dtype, x, w), (x, w)


def _lowp_bwd(eq, out_dtype, res, g):
    x, w = res
    eq_dx, eq_dw = _DX_DW[eq]
    g = g.astype(x.dtype)
    # products written in the operands' dtype (accumulated in fp32 all the same): an fp32 result
    # followed by a convert costs a second pass over it when XLA does not fuse the two
    dx = jnp.einsum(eq_dx, g, w, preferred_element_type=x.dtype)
    dw = jnp.einsum(eq_dw, x, g, preferred_element_type=w.dtype)
    return dx, dw


_lowp_einsum.defvjp(_lowp_fwd, _lowp_bwd)


def _is_lowp(eq: str, x, w) -> bool:
    """Whether the custom-VJP product serves these operands; `eq` must be one whose backward it knows."""
    if eq not in _DX_DW:
        raise ValueError(f"einsum {eq!r} is not one of the products with a low-precision backward: {list(_DX_DW)}")
    return x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16)


def fp32_einsum(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eq, x, w) accumulated and returned in fp32 (eq: one of `_DX_DW`); see `_lowp_einsum`."""
    if _is_lowp(eq, x, w):
        return _lowp_einsum(eq, jnp.dtype(jnp.float32), x, w)
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)


def lowp_einsum(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eq, x, w) accumulated in fp32 and returned in x's dtype. For bf16/fp16 operands the
    GEMM writes that dtype itself, instead of an fp32 result (twice the bytes) that a convert then
    reads again."""
    if _is_lowp(eq, x, w):
        return _lowp_einsum(eq, x.dtype, x, w)
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _dense_matmul(x, w, out_dtype=jnp.float32):
    """x @ w accumulated in fp32, returned in `out_dtype`; decode-sized inputs go through the GEMV kernel
    on GPUs, the rest through one of the einsums above (a low-precision result written by the GEMM itself)."""
    if gemv.use_kernel(_rows(x), x.dtype):
        y = gemv.matvec(x.reshape(-1, x.shape[-1]), w, jnp.dtype(out_dtype))
        return y.reshape(*x.shape[:-1], w.shape[1])
    if jnp.dtype(out_dtype) == jnp.float32:
        return fp32_einsum("...i,io->...o", x, _dense(w, x.dtype))
    return lowp_einsum("...i,io->...o", x, _dense(w, x.dtype)).astype(out_dtype)


GLUS = ("silu",)  # linear(glu=...): the gated activations a decode GEMV computes in its prologue


def silu_mul(g: jax.Array, u: jax.Array) -> jax.Array:
    """silu(g) * u, the SwiGLU input of a gated MLP's down projection, in g's dtype. Autodiff's backward: a
    hand-written one-pass backward (with RMSNorm's) made a Llama-3.2-1B training step no faster on an H100
    (253.7 vs 251.7 ms, train.bench, session 12; docs/training.md): XLA already fuses autodiff's passes."""
    return jax.nn.silu(g) * u


def glu_input(x: jax.Array, glu: str) -> jax.Array:
    """silu(gate) * up for x = gate | up (the input of a gated MLP's down projection), in x's dtype."""
    if glu not in GLUS:
        raise ValueError(f"linear: glu must be one of {GLUS}, got {glu!r}")
    g, u = jnp.split(x, 2, axis=-1)
    return silu_mul(g, u)


def _fused_gemv(x, w, ops, norm, glu, residual):
    """The decode GEMV with the norm (prologue), the gated activation (prologue) or the residual add
    (epilogue) inside, where a kernel takes this product; else None."""
    if ops is not None:
        return None if ops.linear_fused is None else ops.linear_fused(x, w, norm=norm, glu=glu, residual=residual)
    k, n = w.shape
    if x.shape[-1] != k * (2 if glu is not None else 1) or not gemv.use_norm_kernel(_rows(x), x.dtype):
        return None  # (the fused variants have no partitioning rule: off under a split mesh)
    if residual is not None and (residual.dtype != x.dtype or residual.shape != (*x.shape[:-1], n)):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if norm is not None:
        if residual is not None:
            return None
        y = gemv.matvec_norm(x2, w, norm[0], float(norm[1]), float(norm[2]), jnp.dtype(x.dtype))
    else:
        y = gemv.matvec_epi(x2, w, None if residual is None else residual.reshape(-1, n), glu, jnp.dtype(x.dtype))
    return y.reshape(*x.shape[:-1], n)


def linear(x: jax.Array, w, b: jax.Array | None = None, *, norm: tuple | None = None, glu: str | None = None,
           residual: jax.Array | None = None) -> jax.Array:
    """y = x @ w + b with w `[in, out]`; the result has x's dtype, accumulated in fp32.

    norm=(scale, eps, offset): y = rms_norm(x, ...) @ w + b.
    glu="silu": x is [..., 2 in] = gate | up and y = (silu(gate) * up) @ w + b (a gated MLP's down projection).
    residual: returns residual + y (the residual stream's add).
    Decode-sized inputs with a plain weight, or a weight type whose `linear_fused` takes it (int8 QArrays on
    the GEMV route), run these inside the GEMV kernel (no separate norm, activation or add kernels in a
    decode step); every other case computes them around the product, with the same roundings."""
    if norm is not None and glu is not None:
        raise ValueError("linear: norm and glu do not combine (the norm is the input of gate|up, glu of down)")
    if glu is not None and glu not in GLUS:
        raise ValueError(f"linear: glu must be one of {GLUS}, got {glu!r}")
    ops = _ops(w)
    y = None
    if norm is not None or glu is not None or residual is not None:
        # a bias goes between the product and the residual add: the kernels add a residual only without one
        y = _fused_gemv(x, w, ops, norm, glu, residual if b is None else None)
    if y is not None:
        if b is not None:
            y = y + b.astype(y.dtype)
            return y if residual is None else residual + y
        return y
    if norm is not None:
        x = rms_norm(x, *norm)
    if glu is not None:
        x = glu_input(x, glu)
    if ops is not None and ops.linear is not None:
        y = ops.linear(x, w)
    else:
        if x.shape[-1] != w.shape[0]:
            raise ValueError(f"linear: x has {x.shape[-1]} features but w is {tuple(w.shape)} ([in, out])")
        y = _dense_matmul(x, w, x.dtype)
    if b is not None:
        y = y + b.astype(y.dtype)
    return y if residual is None else residual + y


def _vocab_axes(vocab: int) -> tuple[str, ...]:
    """Mesh axes the rules put a `[vocab, dim]` table's rows on, inside `jax.set_mesh` (automatic
    axes of size > 1 dividing `vocab`); () when there is no mesh or the table is not split on vocab."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    from flashit_jax import sharding as shd

    spec = shd.logical_to_spec(("vocab",), mesh, shd.DEFAULT_RULES, (vocab,))
    entry = spec[0] if len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    manual = jax.sharding.AxisType.Manual
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return () if any(types[a] == manual for a in axes) else axes


def _row_spec(mesh, shape, axes):
    """ids/activations: leading dim over the rules' batch axes (when they divide it and are not
    the vocab axes), the rest whole."""
    from flashit_jax import sharding as shd

    spec = tuple(shd.batch_spec(mesh, shape))
    lead = spec[0] if spec else None
    lead_axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
    return None if not lead_axes or set(lead_axes) & set(axes) else lead


def _vocab_parallel_take(ids, w, axes):
    """Lookup in a vocab-split table without gathering it: each device takes the ids in its own
    row range (zeros elsewhere) and one all-reduce of [..., dim] sums them. Left to itself, XLA
    (jax 0.11.2, GPU) all-gathered the whole table for the gather: 525 MB per Llama-3.2-1B step.
    The shard_map is manual over every mesh axis (a partly-automatic one crashed XLA's CPU
    partitioner inside the decode loop, jax 0.10.2); rows stay split over the batch axes."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    lead = _row_spec(mesh, ids.shape, axes)

    def local(ids, w):
        rows = w.shape[0]
        start = jax.lax.axis_index(axes) * rows
        i = ids - start.astype(ids.dtype)
        hit = (i >= 0) & (i < rows)
        out = jnp.take(w, jnp.where(hit, i, 0), axis=0)
        return jax.lax.psum(jnp.where(hit[..., None], out, jnp.zeros((), out.dtype)), axes)

    return jax.shard_map(local, in_specs=(P(lead), P(axes)), out_specs=P(lead), check_vma=False)(ids, w)


def _vocab_parallel_logits(x, w, axes):
    """x @ w.T against a vocab-split table: each device its block of logits (split over vocab)."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    lead = _row_spec(mesh, x.shape, axes)

    def local(x, w):
        return fp32_einsum("...d,vd->...v", x, _dense(w, x.dtype))

    out = P(lead, *((None,) * (x.ndim - 2)), axes)
    return jax.shard_map(local, in_specs=(P(lead), P(axes)), out_specs=out, check_vma=False)(x, w)


def embed(ids: jax.Array, w, dtype=None) -> jax.Array:
    """Rows of the `[vocab, dim]` table; `dtype` defaults to the table's. Under a mesh whose rules
    split the vocab, a vocab-parallel lookup (no device gathers the table)."""
    ops = _ops(w)
    if ops is not None and ops.embed is not None:
        out = ops.embed(ids, w)
    elif axes := _vocab_axes(w.shape[0]):
        out = _vocab_parallel_take(ids, w, axes)
    else:
        out = jnp.take(w, ids, axis=0)
    return out if dtype is None else out.astype(dtype)


def unembed(x: jax.Array, w) -> jax.Array:
    """fp32 logits x @ w.T against a `[vocab, dim]` table (tied embeddings)."""
    ops = _ops(w)
    if ops is not None and ops.unembed is not None:
        return ops.unembed(x, w)
    if gemv.use_kernel(_rows(x), x.dtype):
        return gemv.matvec_t(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
    if axes := _vocab_axes(w.shape[0]):
        return _vocab_parallel_logits(x, w, axes)
    return fp32_einsum("...d,vd->...v", x, _dense(w, x.dtype))


def linear_logits(x: jax.Array, w) -> jax.Array:
    """fp32 logits x @ w for an untied `[dim, vocab]` head."""
    ops = _ops(w)
    if ops is not None and ops.linear is not None:
        return ops.linear(x, w).astype(jnp.float32)
    return _dense_matmul(x, w)
