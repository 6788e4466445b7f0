"""`linrec(a, b, axis)`: the linear recurrence h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along an axis, as one
primitive that Pallas' Triton lowering turns into Triton's own parallel scan (`tt.scan` with a two-operand
combine), so a kernel can scan a whole [T, ...] tile in registers instead of stepping through it.
`take_last(x, axis)`: x's last entry along an axis, as a `tt.reduce` that keeps the entry with the larger
index (Triton has no slicing; where the axis lies in each thread's registers it compiles to no instruction,
where a sum of `where(last, x, 0)` costs an add per entry).

Returns (prod_{s<=t} a_s, h_t). Pallas exposes `tt.scan` only for cumsum; the Triton rule here builds the
combine region from arith ops (no jaxpr tracing, so it does not depend on the lowering's private tracing
helpers, which differ between jax versions), registered in `triton_lowering_rules`. Elsewhere (interpret
mode, XLA) the primitive is `lax.associative_scan` with the same combine.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

try:  # jax >= 0.4.36
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive


def _combine(left, right):
    """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _impl(a, b, *, axis: int):
    return jax.lax.associative_scan(_combine, (a, b), axis=axis)


linrec_p = Primitive("flashit_linrec")
linrec_p.multiple_results = True
linrec_p.def_impl(_impl)
linrec_p.def_abstract_eval(lambda a, b, *, axis: (a, b))
mlir.register_lowering(linrec_p, mlir.lower_fun(_impl, multiple_results=True))


def linrec(a: jax.Array, b: jax.Array, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """(cumulative product of a, the recurrence h) along `axis`; a and b of one float dtype and shape."""
    if a.shape != b.shape or a.dtype != b.dtype or not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"linrec: a and b must be floats of one shape and dtype, got {a.dtype}{list(a.shape)} "
                         f"and {b.dtype}{list(b.shape)}")
    return tuple(linrec_p.bind(a, b, axis=axis % a.ndim))


def _take_last_impl(x, idx, *, axis: int):
    del idx
    return jax.lax.index_in_dim(x, x.shape[axis] - 1, axis, keepdims=False)


take_last_p = Primitive("flashit_take_last")
take_last_p.def_impl(_take_last_impl)
take_last_p.def_abstract_eval(lambda x, idx, *, axis: x.update(shape=x.shape[:axis] + x.shape[axis + 1:]))
mlir.register_lowering(take_last_p, mlir.lower_fun(_take_last_impl, multiple_results=False))


def take_last(x: jax.Array, axis: int = 0) -> jax.Array:
    """x's last entry along `axis` (that axis removed)."""
    axis = axis % x.ndim
    return take_last_p.bind(x, jax.lax.broadcasted_iota(jnp.int32, x.shape, axis), axis=axis)


def _register_triton() -> str:
    """'' once the Triton rule is registered, else why it could not be (the kernels that need it say so)."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith
        from jax._src.lib.triton import dialect as tt
        from jax._src.pallas.triton import lowering as tl
    except ImportError as e:  # pragma: no cover - a jax without Pallas' Triton lowering
        return f"Pallas' Triton lowering is not importable ({e})"
    rules = getattr(tl, "triton_lowering_rules", None)
    if not isinstance(rules, dict):  # pragma: no cover
        return "this jax's Pallas Triton lowering has no triton_lowering_rules table"

    def rule(ctx, a, b, *, axis):
        del ctx
        elt = ir.RankedTensorType(a.type).element_type
        op = tt.ScanOp([a, b], axis)
        block = op.regions[0].blocks.append(elt, elt, elt, elt)
        with ir.InsertionPoint.at_block_begin(block):
            a1, b1, a2, b2 = block.arguments  # the earlier element first
            tt.scan_return([arith.mulf(a1, a2), arith.addf(arith.mulf(a2, b1), b2)])
        op.verify()
        return list(op.result)

    def last_rule(ctx, x, idx, *, axis):
        del ctx
        elt = ir.RankedTensorType(x.type).element_type
        i32 = ir.IntegerType.get_signless(32)
        op = tt.ReduceOp([x, idx], axis)
        block = op.regions[0].blocks.append(elt, i32, elt, i32)
        with ir.InsertionPoint.at_block_begin(block):
            x1, i1, x2, i2 = block.arguments
            later = arith.cmpi(arith.CmpIPredicate.sgt, i2, i1)  # associative and commutative, as tt.reduce needs
            tt.reduce_return([arith.select(later, x2, x1), arith.select(later, i2, i1)])
        op.verify()
        return list(op.result)[0]

    rules[linrec_p] = rule
    rules[take_last_p] = last_rule
    return ""


TRITON_UNAVAILABLE = _register_triton()
