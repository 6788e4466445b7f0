"""Chooses an attention implementation. Kernels register here as they land."""
from __future__ import annotations

from typing import Callable

import jax

from kernels.attention import reference

_IMPLS: dict[str, Callable] = {"xla": reference.attention}


def register(name: str, fn: Callable) -> None:
    _IMPLS[name] = fn


def available() -> list[str]:
    return ["auto", *sorted(_IMPLS), "cudnn"]


def _cudnn(q, k, v, *, q_positions, kv_lengths, causal=True, window=None, segment_ids=None,
           softcap=None, scale=None, mask=None, return_lse=False):
    if segment_ids is not None or softcap is not None or mask is not None or return_lse:
        raise NotImplementedError("the cudnn path serves plain causal/sliding-window attention only")
    tq, tk = q.shape[1], k.shape[1]
    if tq != tk:
        raise NotImplementedError("the cudnn path needs Tq == Tk (no cache)")
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=kv_lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn",
    )


def attention(q, k, v, *, impl: str = "auto", **kw):
    if impl == "auto":
        impl = "xla"
    if impl == "cudnn":
        return _cudnn(q, k, v, **kw)
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown attention impl {impl!r}; known: {available()}") from None
    return fn(q, k, v, **kw)
